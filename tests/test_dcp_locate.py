"""Finding a DCP tensor chunk's bytes inside its ``torch.save`` blob: right, and in a few small reads.

A DCP load opens thousands of such blobs; each located chunk must cost a few
reads of the data file, not ``zipfile``'s dozen.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import async_ckpt as ac
from async_ckpt.interop.dcp_blob import locate_tensor_bytes
from async_ckpt.interop.dcp_metadata import read_dcp
from async_ckpt.storage import LocalStorage


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads = 0

    def size(self) -> int:
        return len(self.data)

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.reads += 1
        buf[:] = self.data[offset : offset + len(buf)]

    def close(self) -> None:
        pass


def _blob(t: torch.Tensor, pad: int) -> tuple[bytes, int, int]:
    b = io.BytesIO()
    torch.save(t, b)
    return b"x" * pad + b.getvalue() + b"y" * 7, pad, len(b.getvalue())


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_located_bytes_are_the_tensor_in_at_most_four_reads() -> None:
    cases: list[Any] = [
        torch.randn(3, 4),
        torch.arange(10, dtype=torch.int16),
        torch.randn(5).to(torch.bfloat16),
        torch.tensor(2.5, dtype=torch.float64),
        torch.randn(300, 700),  # a blob longer than the tail read
    ]
    for t in cases:
        data, start, length = _blob(t, pad=13)
        reader = _BytesReader(data)
        at = locate_tensor_bytes(reader, start, length, t.dtype, tuple(t.shape))
        assert at is not None, t.shape
        assert data[at : at + t.nbytes] == _raw(t)
        assert reader.reads <= 4, (tuple(t.shape), reader.reads)


def test_strided_or_mismatched_chunks_are_decoded_whole() -> None:
    t = torch.randn(4, 6)
    data, start, length = _blob(t.t(), pad=0)  # saved with its strides: not row-major
    assert locate_tensor_bytes(_BytesReader(data), start, length, t.dtype, (6, 4)) is None
    data, start, length = _blob(t, pad=0)
    assert locate_tensor_bytes(_BytesReader(data), start, length, torch.float64, (4, 6)) is None
    assert locate_tensor_bytes(_BytesReader(data), start, length, t.dtype, (6, 4)) is None
    view = torch.arange(20.0)[5:9]  # shares a larger storage: not the chunk alone
    data, start, length = _blob(view, pad=0)
    assert locate_tensor_bytes(_BytesReader(data), start, length, view.dtype, (4,)) is None


def test_every_chunk_of_a_dcp_save_is_found_in_place(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {f"w{i}": torch.randn(i + 1, 33, generator=g) for i in range(20)}
    dcp.save(sd, checkpoint_id=str(tmp_path / "d"))
    storage = LocalStorage()
    ckpt = read_dcp(storage, str(tmp_path / "d"), allow_pickle=False)
    for ref in ckpt.blobs.values():
        raw = (tmp_path / "d" / ref.file).read_bytes()
        reader = _BytesReader(raw)
        at = locate_tensor_bytes(reader, ref.offset, ref.length, ref.dtype, ref.sizes)
        assert at is not None and raw[at : at + sd[ref.fqn].nbytes] == _raw(sd[ref.fqn])
        assert reader.reads <= 4, (ref.fqn, reader.reads)
    got = ac.load_state_dict(tmp_path / "d")
    assert all(torch.equal(got[k], v) for k, v in sd.items())
