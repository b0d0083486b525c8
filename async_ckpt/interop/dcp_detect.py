"""Telling a torch.distributed.checkpoint (DCP) checkpoint from ours, and saying what to do with one."""

from __future__ import annotations

from ..errors import CheckpointError, CheckpointNotFoundError
from ..format.metadata import METADATA_FILE
from ..storage.base import Storage

__all__ = ["DCP_METADATA_FILE", "DcpCheckpointError", "dcp_unsupported", "is_dcp_checkpoint"]

DCP_METADATA_FILE = ".metadata"


class DcpCheckpointError(CheckpointNotFoundError):
    """The location holds a DCP checkpoint, which this entry point does not read."""


def is_dcp_checkpoint(storage: Storage, location: str) -> bool:
    """Whether ``location`` holds DCP's ``.metadata`` and not our ``metadata.json``.

    Callers ask only after reading ours failed, so a load of our own format
    pays nothing for it.
    """
    return _exists(storage, location, DCP_METADATA_FILE) and not _exists(storage, location, METADATA_FILE)


def _exists(storage: Storage, location: str, name: str) -> bool:
    try:
        reader = storage.open_reader(location, name)
    except (CheckpointError, OSError):
        return False
    reader.close()
    return True


def dcp_unsupported(location: str, what: str, *, why: str = "") -> DcpCheckpointError:
    """The error for an entry point that cannot read DCP checkpoints: what it is, and what to do.

    One line: the command line shows only the first line of an error.
    """
    reason = f" ({why})" if why else ""
    return DcpCheckpointError(
        f"{location} is a torch.distributed.checkpoint (DCP) checkpoint, which {what} does not "
        f"read{reason}. ac.load(state_dict, {location!r}) and ac.read_metadata read it, and "
        f"async-ckpt inspect shows it; async-ckpt convert {location} --to async_ckpt OUT makes a "
        "checksummed async_ckpt checkpoint of it."
    )
