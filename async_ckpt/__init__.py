"""async_ckpt: checkpoint PyTorch training without stopping it.

The public surface is small and listed in ``__all__``; see docs/api.md.
"""

from .api import assert_same_keys, async_save, load, load_state_dict, read_metadata, save
from .checkpointer import AsyncCheckpointer, PendingCheckpoint
from .errors import CheckpointError, CheckpointReplacedError, CorruptCheckpointError
from .format.metadata import Metadata
from .manager import CheckpointManager
from .single_rank import SINGLE_RANK, SingleRank

__all__ = [
    "AsyncCheckpointer",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointReplacedError",
    "CorruptCheckpointError",
    "Metadata",
    "PendingCheckpoint",
    "SINGLE_RANK",
    "SingleRank",
    "assert_same_keys",
    "async_save",
    "load",
    "load_state_dict",
    "read_metadata",
    "save",
]

__version__ = "0.1.0"
