"""Where each staged tensor lies in the staging segments: the layout both processes share.

Torch-free: the trainer computes a layout from its tensors (``staging.py``),
the worker from the layout's own specs (``worker/staged_keys.py``), and both
must get the same key; the worker never imports torch. A dtype is its name
(``format/dtypes.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .storage.direct_io import ALIGN as DIO_ALIGN
from .storage.direct_io import DIRECT_MIN

__all__ = [
    "ALIGN",
    "PAGE_ALIGNED_MIN",
    "SEGMENT_BYTES",
    "BufferSpec",
    "Key",
    "Layout",
    "item_start",
    "make_layout",
]

Key = tuple[str, tuple[int, ...] | None]
ALIGN = 64
SEGMENT_BYTES = 1 << 30
# Items of DIRECT_MIN bytes and more start on an O_DIRECT block boundary: the worker's writer
# then sends them from staging without a copy (storage/direct_io.py owns both numbers).
PAGE = DIO_ALIGN
PAGE_ALIGNED_MIN = DIRECT_MIN


def item_start(pos: int, nbytes: int) -> int:
    """Where an item of ``nbytes`` goes in a buffer filled up to ``pos``."""
    align = PAGE if nbytes >= PAGE_ALIGNED_MIN else ALIGN
    return -(-pos // align) * align


@dataclass(frozen=True, slots=True)
class BufferSpec:
    key: Key
    shape: tuple[int, ...]
    dtype: str
    """The dtype's name (``float32``)."""
    segment: int
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Layout:
    specs: tuple[BufferSpec, ...]
    segment_sizes: tuple[int, ...]
    key: str

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def make_layout(tensors: Mapping[Key, Any]) -> Layout:
    """Pack tensors (or ``BufferSpec``s) into segments of up to 1 GiB (a larger tensor gets its own).

    Each value needs ``shape``, ``dtype`` (a ``torch.dtype`` or its name) and ``nbytes``.
    """
    specs: list[BufferSpec] = []
    sizes: list[int] = []
    digest = hashlib.sha256()
    seg, pos = -1, SEGMENT_BYTES
    for key, t in tensors.items():
        nbytes = int(t.nbytes)
        shape = tuple(t.shape)
        dtype = t.dtype if isinstance(t.dtype, str) else str(t.dtype).removeprefix("torch.")
        start = item_start(pos, nbytes)
        if seg < 0 or (start + nbytes > SEGMENT_BYTES and pos > 0):
            if seg >= 0:
                sizes.append(max(pos, ALIGN))
            seg, start = seg + 1, 0
        specs.append(BufferSpec(key, shape, dtype, seg, start, nbytes))
        pos = start + -(-nbytes // ALIGN) * ALIGN
        digest.update(repr((key, shape, dtype)).encode())
    if seg >= 0:
        sizes.append(max(pos, ALIGN))
    return Layout(tuple(specs), tuple(sizes), digest.hexdigest()[:32])
