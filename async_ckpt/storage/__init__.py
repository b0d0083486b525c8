"""Storage backends and their selection from a checkpoint id."""

from .base import ShardReader, ShardSink, Storage
from .detect import StorageDetectionError, detect_storage
from .fsspec_backend import FsspecStorage
from .local import LocalStorage

__all__ = [
    "FsspecStorage",
    "LocalStorage",
    "ShardReader",
    "ShardSink",
    "Storage",
    "StorageDetectionError",
    "detect_storage",
]
