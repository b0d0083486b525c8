"""DTensor support without importing it: ``torch.distributed.tensor`` costs ~1 s to import.

No tensor can be a DTensor unless its module was imported, so checking
``sys.modules`` first keeps plain-tensor users (and the worker processes,
which only ever see plain staging buffers) from paying for the import.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = ["dtensor_class", "is_dtensor", "local_shape_and_offset"]


def dtensor_class() -> Any:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(value: object) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(value, cls)


def local_shape_and_offset(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """This rank's shard of a DTensor: its shape and its offset in the global tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape,
        tensor.device_mesh,  # type: ignore[attr-defined]
        tensor.placements,  # type: ignore[attr-defined]
    )
    return tuple(shape), tuple(offset)
