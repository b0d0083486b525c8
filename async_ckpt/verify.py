"""Checking a whole checkpoint against its checksums, reading every byte once.

Unlike ``load``, which stops at the first problem, this reports every damaged
file and entry, so a user can tell how much of a checkpoint survived.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError
from .format import checksum
from .format.metadata import METADATA_FILE, ChunkRecord, Metadata
from .load_flow import read_checkpoint_metadata, same_checkpoint
from .storage import Storage, detect_storage

__all__ = ["VerifyProblem", "VerifyReport", "verify_checkpoint"]

_READ_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class VerifyProblem:
    file: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}" + (f" (key '{self.key}')" if self.key else "")
        return f"{where}: {self.message}"


@dataclass
class VerifyReport:
    location: str
    files_checked: int = 0
    bytes_checked: int = 0
    total_bytes: int = 0
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_checkpoint(
    checkpoint_id: Any,
    *,
    storage: Storage | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Verify every checksum of a committed checkpoint; ``progress`` gets byte counts as they are read."""
    backend, location = detect_storage(checkpoint_id, storage)
    report = VerifyReport(location)
    try:
        md = read_checkpoint_metadata(backend, location)
    except CheckpointError as exc:
        report.problems.append(VerifyProblem(METADATA_FILE, None, str(exc)))
        return report
    report.total_bytes = sum(f.size for f in md.files.values())
    by_file = _chunks_by_file(md)
    for name in md.files:
        _verify_file(backend, location, md, name, by_file.get(name, []), report, progress)
        report.files_checked += 1
    if report.problems and not same_checkpoint(backend, location, md):
        # Shards read by path may be another save's: what looked damaged was replaced.
        why = "it was replaced (or removed) by another save during verification; verify it again"
        report.problems = [VerifyProblem(METADATA_FILE, None, f"{location}: {why}")]
    return report


def _chunks_by_file(md: Metadata) -> dict[str, list[tuple[str, ChunkRecord]]]:
    """Every chunk record, grouped by its file in one pass (a walk per file would cost files x chunks)."""
    by_file: dict[str, list[tuple[str, ChunkRecord]]] = {}
    for fqn, tensor in md.tensors.items():
        for chunk in tensor.chunks:
            by_file.setdefault(chunk.file, []).append((fqn, chunk))
    return by_file


def _verify_file(
    storage: Storage,
    location: str,
    md: Metadata,
    name: str,
    chunks: list[tuple[str, ChunkRecord]],
    report: VerifyReport,
    progress: Callable[[int], None] | None,
) -> None:
    rec = md.files[name]
    try:
        reader = storage.open_reader(location, name)
    except CheckpointError as exc:
        report.problems.append(VerifyProblem(name, None, str(exc)))
        return
    try:
        if reader.size() != rec.size:
            report.problems.append(
                VerifyProblem(name, None, f"size is {reader.size()} bytes, metadata says {rec.size}")
            )
            return
        header = bytearray(rec.header_length)
        reader.readinto(0, memoryview(header))
        if checksum.digest(header) != rec.header_checksum:
            report.problems.append(VerifyProblem(name, None, "safetensors header checksum mismatch"))
        _tick(report, progress, rec.header_length)
        step = max(md.block_size, _READ_BYTES // md.block_size * md.block_size)
        # One buffer for the whole file: a fresh one per chunk would be zero-filled
        # and page-faulted in again for every chunk, as much CPU as the hashing.
        buf = memoryview(bytearray(min(step, max((c.byte_length for _, c in chunks), default=0))))
        for fqn, chunk in chunks:
            bad = _verify_chunk(
                reader, chunk.byte_offset, chunk.byte_length, chunk.checksums, md.block_size, buf
            )
            _tick(report, progress, chunk.byte_length)
            if bad is not None:
                report.problems.append(
                    VerifyProblem(
                        name,
                        fqn,
                        f"checksum mismatch in chunk at offsets {list(chunk.offsets)}, "
                        f"file bytes from {chunk.byte_offset + bad}",
                    )
                )
    except CheckpointError as exc:
        report.problems.append(VerifyProblem(name, None, str(exc)))
    finally:
        reader.close()


def _verify_chunk(
    reader: Any, start: int, length: int, sums: tuple[str, ...], block: int, buf: memoryview
) -> int | None:
    """Offset (within the chunk) of the first bad block, or None; reads through ``buf``."""
    if length == 0:
        return None if checksum.digest(b"") == sums[0] else 0
    step = len(buf)
    for pos in range(0, length, step):
        n = min(step, length - pos)
        view = buf[:n]
        reader.readinto(start + pos, view)
        for i, bpos in enumerate(range(0, n, block)):
            if checksum.digest(view[bpos : bpos + block]) != sums[(pos // block) + i]:
                return pos + bpos
    return None


def _tick(report: VerifyReport, progress: Callable[[int], None] | None, n: int) -> None:
    report.bytes_checked += n
    if progress is not None:
        progress(n)
