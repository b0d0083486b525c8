"""async_ckpt: checkpoint PyTorch training without stopping it.

The public surface is what ``__all__`` lists, plus the submodules that
docs/api.md names public (``async_ckpt.storage``, ``async_ckpt.integrations``,
``async_ckpt.cli``); every other module is private and may change.
"""

from ._tree import Stateful
from ._version import __version__
from .api import assert_same_keys, async_save, load, load_state_dict, read_metadata, save
from .checkpointer import AsyncCheckpointer, PendingCheckpoint
from .dist import RanksFailedError
from .errors import CheckpointError, CheckpointNotFoundError, CheckpointReplacedError, CorruptCheckpointError
from .format.metadata import Metadata, SaveStats
from .format.values import PickleRefusedError
from .interop.dcp_detect import DcpCheckpointError
from .manager import CheckpointManager
from .single_rank import SINGLE_RANK, SingleRank
from .storage.detect import StorageDetectionError
from .verify import VerifyReport, verify_checkpoint
from .worker.client import WorkerDiedError
from .worker.comm import RankTimeoutError, StoreLostError

__all__ = [
    "AsyncCheckpointer",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReplacedError",
    "CorruptCheckpointError",
    "DcpCheckpointError",
    "Metadata",
    "PendingCheckpoint",
    "PickleRefusedError",
    "RankTimeoutError",
    "RanksFailedError",
    "SINGLE_RANK",
    "SaveStats",
    "SingleRank",
    "Stateful",
    "StorageDetectionError",
    "StoreLostError",
    "VerifyReport",
    "WorkerDiedError",
    "__version__",
    "assert_same_keys",
    "async_save",
    "load",
    "load_state_dict",
    "read_metadata",
    "save",
    "verify_checkpoint",
]
