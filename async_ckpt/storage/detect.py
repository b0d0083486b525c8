"""Choosing a backend from a checkpoint id."""

from __future__ import annotations

import os
from typing import Any

import fsspec

from ..errors import CheckpointError
from .base import Storage
from .fsspec_backend import FsspecStorage
from .local import LocalStorage

__all__ = ["StorageDetectionError", "detect_storage"]


class StorageDetectionError(CheckpointError):
    """The checkpoint id names no storage we know."""


def detect_storage(checkpoint_id: Any, storage: Storage | None = None) -> tuple[Storage, str]:
    """``(backend, location)`` for ``checkpoint_id``; an explicit ``storage`` wins."""
    if storage is not None:
        return storage, storage.resolve(checkpoint_id)
    if isinstance(checkpoint_id, os.PathLike) or (
        isinstance(checkpoint_id, str) and ("://" not in checkpoint_id or checkpoint_id.startswith("file://"))
    ):
        if isinstance(checkpoint_id, str) and not checkpoint_id:
            raise StorageDetectionError("Cannot detect storage for an empty checkpoint id")
        local = LocalStorage()
        return local, local.resolve(checkpoint_id)
    if isinstance(checkpoint_id, str):
        scheme = checkpoint_id.split("://", 1)[0]
        if scheme in fsspec.available_protocols():
            remote = FsspecStorage()
            return remote, remote.resolve(checkpoint_id)
        raise StorageDetectionError(
            f"Cannot detect storage for checkpoint id {checkpoint_id!r}: fsspec knows no "
            f"'{scheme}://' protocol. Use a local path, a URL fsspec supports, or pass storage=."
        )
    raise StorageDetectionError(
        f"Cannot detect storage for checkpoint id of type {type(checkpoint_id).__qualname__}; "
        "pass a path, a URL or storage=."
    )
