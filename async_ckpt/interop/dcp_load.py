"""Loading a DCP checkpoint with our load machinery: translated metadata, a chunk view, our resharding."""

from __future__ import annotations

from typing import Any

from ..dist import Comm, run_collectively
from ..errors import CheckpointError
from ..format.metadata import Metadata
from ..format.values import PickleRefusedError
from ..load_flow import _load_into
from ..state_dict import LoadView
from ..storage.base import Storage
from .dcp_metadata import read_dcp
from .dcp_storage import DcpSource

__all__ = ["load_dcp", "read_dcp_metadata"]


def read_dcp_metadata(storage: Storage, location: str) -> Metadata:
    """Our read model of a DCP checkpoint; values that need full unpickling show as pickled."""
    return read_dcp(storage, location, allow_pickle=False).md


def load_dcp(
    comm: Comm,
    storage: Storage,
    location: str,
    state_dict: dict[str, Any],
    *,
    strict: bool,
    allow_pickle: bool,
) -> Metadata:
    """``ac.load`` for a DCP checkpoint. DCP stores no checksums, so there is nothing to verify."""

    def local() -> Metadata:
        ckpt = read_dcp(storage, location, allow_pickle=allow_pickle)
        view = LoadView(state_dict, ckpt.md.tree)
        try:
            _refuse_pickled(view, ckpt.needs_pickle, location)
            with DcpSource(storage, location, ckpt) as chunks:
                # Every pickle left in ckpt.md was made in memory by read_dcp, from an
                # object weights_only loading (or the caller's allow_pickle) accepted.
                _load_into(
                    view,
                    ckpt.md,
                    comm.rank,
                    comm.world_size,
                    chunks,  # type: ignore[arg-type]
                    location,
                    strict=strict,
                    allow_pickle=True,
                    verify=False,
                )
                if chunks.replaced():
                    raise CheckpointError(
                        f"DCP checkpoint {location} was overwritten by another save while it was "
                        "being read (DCP saves in place); nothing was loaded from it. Load it again."
                    )
        except BaseException:
            view.restore()
            raise
        view.finish()
        return ckpt.md

    return run_collectively(comm, "load", local)


def _refuse_pickled(view: LoadView, needs_pickle: frozenset[str], location: str) -> None:
    for fqn in view.leaves:
        hit = next((p for p in needs_pickle if fqn == p or fqn.startswith(p + ".")), None)
        if hit is not None:
            raise PickleRefusedError(
                f"key '{hit}' in DCP checkpoint {location} holds objects that only full unpickling "
                "rebuilds, and unpickling runs code from the file. Pass allow_pickle=True to load() "
                "only if you trust this checkpoint."
            )
