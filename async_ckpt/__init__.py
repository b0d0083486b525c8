"""async_ckpt: checkpoint PyTorch training without stopping it.

The public surface is what ``__all__`` lists, plus the submodules that
docs/api.md names public (``async_ckpt.storage``, ``async_ckpt.integrations``,
``async_ckpt.cli``); every other module is private and may change.
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from ._tree import Stateful
    from .api import assert_same_keys, async_save, load, load_state_dict, read_metadata, save
    from .checkpointer import AsyncCheckpointer, PendingCheckpoint
    from .dist import RanksFailedError
    from .errors import (
        CheckpointError,
        CheckpointNotFoundError,
        CheckpointReplacedError,
        CorruptCheckpointError,
    )
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

_LAZY = {
    "AsyncCheckpointer": ".checkpointer",
    "CheckpointError": ".errors",
    "CheckpointManager": ".manager",
    "CheckpointNotFoundError": ".errors",
    "CheckpointReplacedError": ".errors",
    "CorruptCheckpointError": ".errors",
    "DcpCheckpointError": ".interop.dcp_detect",
    "Metadata": ".format.metadata",
    "PendingCheckpoint": ".checkpointer",
    "PickleRefusedError": ".format.values",
    "RankTimeoutError": ".worker.comm",
    "RanksFailedError": ".dist",
    "SINGLE_RANK": ".single_rank",
    "SaveStats": ".format.metadata",
    "SingleRank": ".single_rank",
    "Stateful": "._tree",
    "StorageDetectionError": ".storage.detect",
    "StoreLostError": ".worker.comm",
    "VerifyReport": ".verify",
    "WorkerDiedError": ".worker.client",
    "assert_same_keys": ".api",
    "async_save": ".api",
    "load": ".api",
    "load_state_dict": ".api",
    "read_metadata": ".api",
    "save": ".api",
    "verify_checkpoint": ".verify",
}
"""Where each public name lives: imported on first use, so ``import async_ckpt`` (and pytest
loading the ``async_ckpt.testing`` plugin) costs no torch import until one is used."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
