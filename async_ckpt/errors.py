"""The library's exceptions: one type per condition a caller may want to catch."""

from __future__ import annotations

__all__ = ["CheckpointError", "CorruptCheckpointError", "CheckpointNotFoundError"]


class CheckpointError(RuntimeError):
    """Base of every error async_ckpt raises about a checkpoint."""


class CorruptCheckpointError(CheckpointError):
    """A checksum mismatch, a truncated file, or malformed metadata or headers."""


class CheckpointNotFoundError(CheckpointError):
    """No committed checkpoint exists at the given id."""
