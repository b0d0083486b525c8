"""The on-disk format: metadata.json schema, shard files, checksums. See docs/format.md."""

from .metadata import (
    FORMAT_VERSION,
    METADATA_FILE,
    ChunkRecord,
    FileRecord,
    Metadata,
    SaveStats,
    TensorRecord,
    ValueRecord,
    decode_metadata,
    encode_metadata,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "ChunkRecord",
    "FileRecord",
    "Metadata",
    "SaveStats",
    "TensorRecord",
    "ValueRecord",
    "decode_metadata",
    "encode_metadata",
]
