"""Reading torch.distributed.checkpoint (DCP) checkpoints: written by real ``dcp.save``, read by ``ac``.

Every load is compared bit for bit with what ``dcp.load`` puts into an
identical target. Hostile ``.metadata`` and chunk blobs carry payloads that
would create a marker file; the tests check that the marker never appears.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

import async_ckpt as ac
from async_ckpt.cli import main
from async_ckpt.format.values import PickleRefusedError, decode_value
from async_ckpt.interop.dcp_blob import locate_tensor_bytes
from async_ckpt.interop.dcp_metadata import read_dcp
from async_ckpt.interop.dcp_storage import DcpSource
from async_ckpt.storage import LocalStorage


class Tagged:
    """A value only full unpickling can rebuild (a class from this module)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tagged) and other.tag == self.tag

    __hash__ = None  # type: ignore[assignment]


class _Payload:
    """Unpickling it runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1), betas=(0.8, 0.95))
    for _ in range(2):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _extras(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "transposed": torch.randn(4, 7, generator=g).t(),  # saved with its strides, not row-major
        "half": torch.randn(9, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(float(seed) + 0.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4) * (seed + 1),
        "step": 100 + seed,
        "name": f"run-{seed}",
        "nan": math.nan if seed == 0 else 1.0,
        "hist": [1.5 * seed, 2.5, 3.5],
        "pair": (seed, "x"),
        "nested": {"inner": {"w": torch.full((2, 2), float(seed))}, "lr_list": [0.1, 0.2 + seed]},
    }


def _state(seed: int) -> dict[str, Any]:
    model, opt = _trained(seed)
    return {"model": model, "optim": opt, "extra": _extras(seed)}


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _snapshot(node: Any) -> Any:
    """Plain nested data with every tensor as (dtype, shape, bytes): compares bit for bit, NaN included."""
    if isinstance(node, (nn.Module, torch.optim.Optimizer)):
        return _snapshot(node.state_dict())
    if isinstance(node, torch.Tensor):
        if type(node) is not torch.Tensor and hasattr(node, "to_local"):
            node = node.to_local()
        return ("tensor", node.dtype, tuple(node.shape), _bits(node))
    if isinstance(node, dict):
        return {k: _snapshot(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return (type(node).__name__, [_snapshot(v) for v in node])
    if isinstance(node, float) and math.isnan(node):
        return ("nan",)
    return node


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dcp") / "ckpt"
    dcp.save(_state(0), checkpoint_id=str(path))
    return path


def test_load_reads_a_dcp_checkpoint_bit_exact_against_dcp_load(dcp_dir: Path) -> None:
    ours, theirs = _state(1), _state(1)
    assert _snapshot(ours) != _snapshot(_state(0))
    ac.load(ours, dcp_dir)
    dcp.load(theirs, checkpoint_id=str(dcp_dir))
    assert _snapshot(ours) == _snapshot(theirs)
    assert _snapshot(ours) == _snapshot(_state(0))
    assert ours["extra"]["pair"] == (0, "x") and isinstance(ours["extra"]["hist"], list)


def test_load_into_a_meta_device_model_from_dcp(dcp_dir: Path) -> None:
    with torch.device("meta"):
        meta = _model(5)
    ac.load({"model": meta}, dcp_dir, strict=False)
    expected = _trained(0)[0].state_dict()
    assert not any(p.is_meta for p in meta.parameters())
    assert _snapshot(meta.state_dict()) == _snapshot(expected)


def test_fresh_optimizer_gets_its_state_from_dcp(dcp_dir: Path) -> None:
    model = _model(3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    ac.load({"model": model, "optim": opt}, dcp_dir, strict=False)
    assert _snapshot(opt.state_dict()) == _snapshot(_trained(0)[1].state_dict())


def test_read_metadata_describes_a_dcp_checkpoint(dcp_dir: Path) -> None:
    md = ac.read_metadata(dcp_dir)
    assert md.tensors["model.0.weight"].shape == (5, 6)
    assert md.tensors["model.0.weight"].dtype == torch.float32
    assert md.tensors["extra.half"].dtype == torch.bfloat16
    assert md.tensors["extra.transposed"].shape == (7, 4)
    assert _value(md, "extra.step") == 100
    assert _value(md, "extra.hist") == [0.0, 2.5, 3.5]  # a list without tensors is one value
    assert "optim.state.0.exp_avg" in md.tensors
    assert _value(md, "optim.param_groups.0.betas") == (0.8, 0.95)


def _value(md: ac.Metadata, fqn: str) -> Any:
    return decode_value(md.values[fqn].value, fqn=fqn, allow_pickle=False)


def test_missing_key_in_dcp_checkpoint_is_an_error_naming_it(dcp_dir: Path) -> None:
    with pytest.raises(ac.CheckpointError, match=r"'extra\.absent'"):
        ac.load({"extra": {"absent": torch.zeros(2)}}, dcp_dir)
    target = {"extra": {"absent": torch.zeros(2), "step": 0}}
    ac.load(target, dcp_dir, strict=False)
    assert target["extra"]["step"] == 100


def test_dcp_value_needing_pickle_loads_only_with_allow_pickle(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    dcp.save({"obj": Tagged("a"), "w": torch.ones(3)}, checkpoint_id=str(path))
    target: dict[str, Any] = {"obj": None, "w": torch.zeros(3)}
    with pytest.raises(PickleRefusedError, match="'obj'"):
        ac.load(target, path)
    assert target["obj"] is None and torch.equal(target["w"], torch.zeros(3))
    ac.load({"w": target["w"]}, path)  # the pickled key is not asked for: no refusal
    ac.load(target, path, allow_pickle=True)
    assert target["obj"] == Tagged("a")


def test_hostile_dcp_value_never_runs_its_payload(tmp_path: Path) -> None:
    path, marker = tmp_path / "ckpt", tmp_path / "pwned"
    dcp.save({"evil": _Payload(marker), "w": torch.ones(2)}, checkpoint_id=str(path))
    assert not marker.exists()
    with pytest.raises(PickleRefusedError, match="'evil'"):
        ac.load({"evil": None}, path)
    ac.read_metadata(path)
    assert not marker.exists()


def test_hostile_dcp_metadata_is_refused_naming_the_global(dcp_dir: Path, tmp_path: Path) -> None:
    path, marker = tmp_path / "ckpt", tmp_path / "pwned"
    path.mkdir()
    for f in dcp_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    for call in (lambda: ac.read_metadata(path), lambda: ac.load(_state(1), path)):
        with pytest.raises(ac.CheckpointError, match=r"refused.*(posix|os)\.system"):
            call()
    assert not marker.exists()


def _hostile_tensor_checkpoint(path: Path, payload: bytes) -> None:
    """A DCP checkpoint whose one tensor chunk is the given blob."""
    path.mkdir()
    (path / "__0_0.distcp").write_bytes(payload)
    md = Metadata(
        state_dict_metadata={
            "w": TensorStorageMetadata(
                TensorProperties(dtype=torch.float32),
                torch.Size([2]),
                [ChunkStorageMetadata(torch.Size([0]), torch.Size([2]))],
            )
        },
        planner_data={"w": ("w",)},
        storage_data={MetadataIndex("w", [0]): _StorageInfo("__0_0.distcp", 0, len(payload))},
    )
    (path / ".metadata").write_bytes(pickle.dumps(md))


def test_hostile_dcp_tensor_chunk_never_runs_its_payload(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Payload(marker)))
        z.writestr("archive/byteorder", "little")
    _hostile_tensor_checkpoint(tmp_path / "a", buf.getvalue())
    with pytest.raises(ac.CheckpointError, match="'w'"):
        ac.load({"w": torch.zeros(2)}, tmp_path / "a")
    _hostile_tensor_checkpoint(tmp_path / "b", pickle.dumps(_Payload(marker)))
    with pytest.raises(ac.CheckpointError, match="'w'"):
        ac.load({"w": torch.zeros(2)}, tmp_path / "b")
    assert not marker.exists()


def test_dcp_chunk_of_the_wrong_shape_is_corruption(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(torch.ones(3), buf)  # metadata says [2]
    _hostile_tensor_checkpoint(tmp_path / "c", buf.getvalue())
    with pytest.raises(ac.CorruptCheckpointError, match="'w'"):
        ac.load({"w": torch.zeros(2)}, tmp_path / "c")


def test_cli_inspect_reads_dcp_and_verify_says_what_it_is(
    dcp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(dcp_dir)]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.checkpoint (DCP)" in out and "model.0.weight" in out
    main(["verify", str(dcp_dir)])
    out = capsys.readouterr()
    assert "DCP" in out.out + out.err and "checksum" in out.out + out.err
    # convert reads DCP checkpoints (tests/test_dcp_convert.py).


def test_chunk_bytes_are_found_in_place_inside_the_torch_save_blob(dcp_dir: Path) -> None:
    ckpt = read_dcp(LocalStorage(), str(dcp_dir), allow_pickle=False)
    data = (dcp_dir / "__0_0.distcp").read_bytes()
    reader = LocalStorage().open_reader(str(dcp_dir), "__0_0.distcp")
    try:
        for fqn, expected in (("extra.ids", _extras(0)["ids"]), ("extra.half", _extras(0)["half"])):
            ref = ckpt.blobs[ckpt.md.tensors[fqn].chunks[0].file]
            start = locate_tensor_bytes(reader, ref.offset, ref.length, ref.dtype, ref.sizes)
            assert start is not None and ref.offset < start < ref.offset + ref.length
            assert data[start : start + expected.nbytes] == _bits(expected)
        # Saved with its strides: not row-major in the blob, so it is decoded whole instead.
        ref = ckpt.blobs[ckpt.md.tensors["extra.transposed"].chunks[0].file]
        assert locate_tensor_bytes(reader, ref.offset, ref.length, ref.dtype, ref.sizes) is None
    finally:
        reader.close()


def test_truncated_dcp_data_file_is_corruption_naming_the_key(dcp_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    path.mkdir()
    for f in dcp_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    md = ac.read_metadata(path)
    chunk = md.tensors["model.2.weight"].chunks[0]
    cut = int(chunk.file.rsplit("@", 1)[1]) + 10
    with open(path / "__0_0.distcp", "r+b") as f:
        f.truncate(cut)
    with pytest.raises(ac.CorruptCheckpointError, match=r"model\.2\.weight"):
        ac.load({"model": _model(1)}, path)


def test_dcp_source_notices_a_save_over_the_checkpoint_it_reads(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(path))
    ckpt = read_dcp(LocalStorage(), str(path), allow_pickle=False)
    with DcpSource(LocalStorage(), str(path), ckpt) as source:
        assert not source.replaced()
        dcp.save({"w": torch.zeros(3)}, checkpoint_id=str(path))  # DCP overwrites in place
        assert source.replaced()
