"""What a save checks about its target when it is called, where that is cheap (local paths).

The commit itself refuses a target it must not replace (storage/local.py);
these checks only say the same things sooner: an async save would otherwise
stage the whole state and fail at ``result()`` with the worker's traceback.
A few ``stat`` calls; other storages are checked when the save writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import CheckpointError
from .format.metadata import METADATA_FILE
from .storage import LocalStorage, Storage

__all__ = ["check_save_target"]

log = logging.getLogger("async_ckpt")


def check_save_target(backend: Storage, location: str, *, rank: int | None) -> None:
    """Refuse a local target that is, or lies under, a file; log when it replaces a committed checkpoint.

    Saves overwrite, as DCP's do: the INFO line is so that replacing a
    checkpoint is never silent. ``rank`` names the rank in the error; only
    rank 0 (or an unknown rank) logs, so one save logs one line.
    """
    if not isinstance(backend, LocalStorage):
        return
    target = Path(location)
    for path in (target, *target.parents):
        if path.is_dir():
            break
        if path.exists():
            where = "" if rank is None else f" (rank {rank})"
            what = "the checkpoint id" if path == target else f"{path}, a parent of the checkpoint id,"
            raise CheckpointError(
                f"cannot save to {target}{where}: {what} is a file, not a directory; "
                "choose another checkpoint id or move the file"
            )
    if path == target and rank in (None, 0) and (target / METADATA_FILE).is_file():
        log.info("replacing the committed checkpoint at %s (a save to an existing id overwrites it)", target)
