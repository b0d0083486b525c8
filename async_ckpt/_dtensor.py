"""DTensor support without importing it: ``torch.distributed.tensor`` costs ~1 s to import.

No tensor can be a DTensor unless its module was imported, so checking
``sys.modules`` first keeps plain-tensor users (and the worker processes,
which only ever see plain staging buffers) from paying for the import.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = ["dtensor_class", "is_dtensor", "is_sharded_tensor", "local_shape_and_offset", "outside_mesh"]


def dtensor_class() -> Any:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(value: object) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(value, cls)


def is_sharded_tensor(value: object) -> bool:
    # Checked before anything else touches the value: a ShardedTensor raises on
    # every attribute torch does not implement for it (even ``.dtype``).
    module = sys.modules.get("torch.distributed._shard.sharded_tensor.api")
    cls = getattr(module, "ShardedTensorBase", None) if module is not None else None
    return cls is not None and isinstance(value, cls)


def outside_mesh(tensor: torch.Tensor) -> bool:
    """Whether this rank is not in the DTensor's mesh (a pipeline or expert submesh).

    Such a rank holds no part of it: torch reports an empty local shape there.
    """
    return tensor.device_mesh.get_coordinate() is None  # type: ignore[attr-defined, no-any-return]


def local_shape_and_offset(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """This rank's shard of a DTensor: its shape and its offset in the global tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape,
        tensor.device_mesh,  # type: ignore[attr-defined]
        tensor.placements,  # type: ignore[attr-defined]
    )
    return tuple(shape), tuple(offset)
