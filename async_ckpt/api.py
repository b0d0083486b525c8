"""The public entry points: wiring only, from arguments to the flows that do the work."""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._gc import gc_paused
from .dist import comm_for, run_collectively
from .errors import CheckpointError, CorruptCheckpointError
from .format.metadata import Metadata
from .interop import is_dcp_checkpoint, load_dcp, read_dcp_metadata
from .layout_cache import blocking_plan
from .load_flow import load_collective, read_checkpoint_metadata
from .load_tree import load_tree_collective
from .local_plan import byte_addresses, byte_sources
from .overlap_guard import GuardArg
from .pending import PendingCheckpoint
from .save_flow import RankData, save_collective
from .save_options import SaveOptions
from .save_target import check_save_target
from .single_rank import ProcessGroupArg, SingleRank, check_whole_on_this_rank
from .state_dict import flatten
from .storage import Storage, detect_storage

if TYPE_CHECKING:
    from .checkpointer import AsyncCheckpointer

__all__ = ["assert_same_keys", "async_save", "load", "load_state_dict", "read_metadata", "save"]

log = logging.getLogger("async_ckpt")


def save(
    state_dict: dict[str, Any],
    checkpoint_id: Any,
    *,
    process_group: ProcessGroupArg = None,
    storage: Storage | None = None,
    allow_pickle: bool = False,
    verify_replicas: bool = False,
) -> Metadata:
    """Save ``state_dict`` and return the committed checkpoint's metadata (blocking, collective).

    ``process_group=SINGLE_RANK``: this rank saves alone, its own view of the state dict.
    """
    with gc_paused():
        return _save(state_dict, checkpoint_id, process_group, storage, allow_pickle, verify_replicas)


def _save(
    state_dict: dict[str, Any],
    checkpoint_id: Any,
    process_group: ProcessGroupArg,
    storage: Storage | None,
    allow_pickle: bool,
    verify_replicas: bool,
) -> Metadata:
    comm = comm_for(process_group)
    t0 = time.perf_counter()

    def prepare() -> Any:
        # Inside the collective step: a checkpoint id one rank cannot use must fail every rank.
        backend, location = detect_storage(checkpoint_id, storage)
        check_save_target(backend, location, rank=comm.rank)
        flat = flatten(state_dict, allow_pickle=allow_pickle)
        if isinstance(process_group, SingleRank):
            check_whole_on_this_rank(flat.entries)
        local = blocking_plan(flat, allow_pickle=allow_pickle, verify_replicas=verify_replicas)
        return backend, location, flat, local

    backend, location, flat, local = run_collectively(comm, "preparing the state dict", prepare)
    options = SaveOptions(allow_pickle=allow_pickle, verify_replicas=verify_replicas)
    data = RankData(local.plan, byte_sources(local.tensors), local.values, byte_addresses(local.tensors))
    md = save_collective(comm, backend, location, data, flat.tree, options, stage_s=time.perf_counter() - t0)
    if md.stats is not None:
        log.info("saved %s on rank %d: %s", location, comm.rank, md.stats.describe())
    return md


def load(
    state_dict: dict[str, Any],
    checkpoint_id: Any,
    *,
    process_group: ProcessGroupArg = None,
    storage: Storage | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    verify: bool = True,
    cast: bool = False,
) -> None:
    """Load a checkpoint into ``state_dict`` in place, resharding as needed.

    ``verify=False`` skips checksum verification (faster, and trusts the disk).
    ``cast=True`` converts saved tensors to the target's dtype (else a mismatch raises).
    A torch.distributed.checkpoint (DCP) directory is read too (it has no checksums).
    """
    backend, location = detect_storage(checkpoint_id, storage)
    comm = comm_for(process_group)
    with gc_paused():
        try:
            load_collective(
                comm,
                backend,
                location,
                state_dict,
                strict=strict,
                allow_pickle=allow_pickle,
                verify=verify,
                cast=cast,
            )
        except CheckpointError as exc:
            if isinstance(exc, CorruptCheckpointError) or not is_dcp_checkpoint(backend, location):
                raise
            load_dcp(comm, backend, location, state_dict, strict=strict, allow_pickle=allow_pickle)


def load_state_dict(
    checkpoint_id: Any,
    *,
    keys: Sequence[str] | None = None,
    map_location: str | torch.device = "cpu",
    process_group: ProcessGroupArg = None,
    storage: Storage | None = None,
    allow_pickle: bool = False,
    verify: bool = True,
) -> dict[Any, Any]:
    """A new nested state dict rebuilt from the checkpoint's saved tree, with no target to load into.

    Tensors come back whole, as plain tensors on ``map_location``, however they
    were sharded. ``keys`` selects flattened keys or key prefixes (``"model"``,
    ``"optim.state.0"``) and only their bytes are read. Reads DCP checkpoints too.
    With a process group, every rank gets the whole (selected) tree.
    """
    backend, location = detect_storage(checkpoint_id, storage)
    comm = comm_for(process_group)
    with gc_paused():
        return load_tree_collective(
            comm,
            backend,
            location,
            keys=keys,
            map_location=map_location,
            allow_pickle=allow_pickle,
            verify=verify,
        )


def read_metadata(checkpoint_id: Any, *, storage: Storage | None = None) -> Metadata:
    """The metadata of a committed checkpoint; raises CheckpointError if there is none."""
    backend, location = detect_storage(checkpoint_id, storage)
    try:
        return read_checkpoint_metadata(backend, location)
    except CheckpointError as exc:
        if isinstance(exc, CorruptCheckpointError) or not is_dcp_checkpoint(backend, location):
            raise
        return read_dcp_metadata(backend, location)


def assert_same_keys(state_dict: dict[str, Any], process_group: ProcessGroupArg = None) -> None:
    """Raise ``AssertionError`` on every rank if some flattened key is not on every rank."""
    comm = comm_for(process_group)
    keys = set(flatten(state_dict, allow_pickle=True).entries)
    gathered = comm.gather(sorted(keys))
    problem: str | None = None
    if gathered is not None:
        everywhere = set.intersection(*(set(k) for k in gathered))
        uneven = sorted(set().union(*(set(k) for k in gathered)) - everywhere)
        if uneven:
            lines = [
                f"  '{key}': missing on rank(s) "
                + ", ".join(str(r) for r, ks in enumerate(gathered) if key not in set(ks))
                for key in uneven[:20]
            ]
            more = f"\n  ... and {len(uneven) - 20} more" if len(uneven) > 20 else ""
            problem = f"{len(uneven)} key(s) are not on every rank:\n" + "\n".join(lines) + more
    if comm.world_size > 1:
        problem = comm.broadcast(problem)
    if problem:
        raise AssertionError(problem)


# ------------------------------------------------------------------ async

_defaults: dict[int, Any] = {}
_defaults_lock = threading.Lock()


def _default_checkpointer(process_group: ProcessGroupArg) -> AsyncCheckpointer:
    from .checkpointer import AsyncCheckpointer

    key = id(process_group)
    with _defaults_lock:
        ckpt = _defaults.get(key)
        if ckpt is None:
            if not _defaults:
                atexit.register(_close_defaults)
            ckpt = _defaults[key] = AsyncCheckpointer(process_group)
    return ckpt


def _close_defaults() -> None:
    with _defaults_lock:
        ckpts = list(_defaults.values())
        _defaults.clear()
    for ckpt in ckpts:
        ckpt.close(timeout=60.0)


async def async_save(
    state_dict: dict[str, Any],
    checkpoint_id: Any,
    *,
    process_group: ProcessGroupArg = None,
    storage: Storage | None = None,
    overlap: bool = False,
    guard: GuardArg = True,
) -> PendingCheckpoint:
    """Stage ``state_dict`` and return a ``PendingCheckpoint`` (await it for the ``Metadata``).

    ``overlap`` and ``guard`` as for ``AsyncCheckpointer.save``. Uses one
    default ``AsyncCheckpointer`` per process group, created on first use and
    closed at interpreter exit.
    """
    ckpt = _default_checkpointer(process_group)
    return await ckpt.async_save(state_dict, checkpoint_id, overlap=overlap, storage=storage, guard=guard)
