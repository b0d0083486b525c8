"""The library's exceptions: one type per condition a caller may want to catch."""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointNotFoundError", "CheckpointReplacedError", "CorruptCheckpointError"]


class CheckpointError(RuntimeError):
    """Base of every error async_ckpt raises about a checkpoint."""


class CorruptCheckpointError(CheckpointError):
    """A checksum mismatch, a truncated file, or malformed metadata or headers."""


class CheckpointNotFoundError(CheckpointError):
    """No committed checkpoint exists at the given id."""


class CheckpointReplacedError(CheckpointError):
    """The checkpoint was replaced (or removed) by another save while it was being read.

    Nothing of it was returned; loading again reads the new checkpoint.
    """
