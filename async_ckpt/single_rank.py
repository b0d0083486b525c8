"""``SINGLE_RANK``: save and load from one rank alone inside a distributed job.

Frameworks that checkpoint from rank 0 only (Lightning) cannot use a call
that is collective over the default group: the other ranks never join it.
With ``process_group=SINGLE_RANK`` a call runs as if this process were the
whole job (world 1, rank 0): no collective, no process group created, no
store shared with other ranks, and the worker of an ``AsyncCheckpointer``
is this rank's alone.

What such a save writes is this rank's view of the state dict. A DTensor
sharded over other ranks has only a piece here, so it is refused (naming the
key) rather than written as a checkpoint with holes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final, TypeAlias

import torch
import torch.distributed as dist

from ._dtensor import is_dtensor, local_shape_and_offset, outside_mesh

__all__ = ["SINGLE_RANK", "ProcessGroupArg", "SingleRank", "check_whole_on_this_rank"]


class SingleRank(enum.Enum):
    """The type of ``SINGLE_RANK`` (an enum, so that type checkers know its one value)."""

    SINGLE_RANK = "SINGLE_RANK"

    def __repr__(self) -> str:
        return "async_ckpt.SINGLE_RANK"


SINGLE_RANK: Final = SingleRank.SINGLE_RANK
"""``process_group=SINGLE_RANK``: this rank alone, whatever ``torch.distributed`` holds."""

ProcessGroupArg: TypeAlias = dist.ProcessGroup | SingleRank | None
"""What a ``process_group=`` argument accepts: a group, ``SINGLE_RANK``, or ``None`` (the default group)."""


def check_whole_on_this_rank(entries: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first DTensor of which this rank holds less than the whole."""
    for fqn, value in entries.items():
        if not (isinstance(value, torch.Tensor) and is_dtensor(value)):
            continue
        dt: Any = value
        if outside_mesh(value):
            held = "none of it (this rank is not in its mesh)"
        else:
            shape, _ = local_shape_and_offset(value)
            if shape == tuple(value.shape):
                continue  # replicated on every mesh dimension: the local shard is the tensor
            held = f"a {list(shape)} shard of {list(value.shape)} ({dt.placements})"
        raise ValueError(
            f"cannot save key '{fqn}' with process_group=SINGLE_RANK: it is a DTensor on a "
            f"{dt.device_mesh.size()}-rank mesh and this rank holds {held}. Save its "
            "full_tensor() instead (a collective: every rank of the mesh calls it), or save "
            "collectively from every rank (process_group=None)"
        )
