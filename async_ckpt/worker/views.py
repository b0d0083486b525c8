"""The worker's view of staged bytes: read-only memoryviews straight on the shared segments.

No torch here (the worker never imports it): the writer needs bytes, and the
plan already says each item's shape and dtype.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

from .._address import address_of
from ..buffer_layout import PAGE_ALIGNED_MIN, BufferSpec, Key

__all__ = ["byte_views", "close_maps", "map_segments", "view_addresses", "view_sources"]


def map_segments(fds: Sequence[int], sizes: Sequence[int]) -> list[mmap.mmap]:
    """Map each segment read-only and close its descriptor (the mapping keeps it)."""
    try:
        return [
            mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) for fd, size in zip(fds, sizes, strict=True)
        ]
    finally:
        for fd in fds:
            os.close(fd)


def byte_views(maps: Sequence[mmap.mmap], specs: Iterable[BufferSpec]) -> dict[Key, memoryview]:
    """Each item's bytes, by key, without a copy."""
    bases = [memoryview(m) for m in maps]
    return {s.key: bases[s.segment][s.offset : s.offset + s.nbytes] for s in specs}


def close_maps(maps: Sequence[mmap.mmap], views: Iterable[memoryview] = ()) -> None:
    """Unmap; a view still held elsewhere (a failed save's traceback) keeps its map until it goes."""
    for v in views:
        with contextlib.suppress(BufferError, ValueError):
            v.release()
    for m in maps:
        with contextlib.suppress(BufferError):
            m.close()


def view_sources(views: Mapping[Key, memoryview]) -> dict[Key, Callable[[], memoryview]]:
    """The writer's byte sources (``save_flow.RankData``) for views that already hold the bytes."""
    return {key: partial(_same, v) for key, v in views.items()}


def view_addresses(views: Mapping[Key, memoryview]) -> dict[Key, int]:
    """Where each view large enough to be written without a copy lies (``save_flow.RankData.addresses``)."""
    return {key: address_of(v) for key, v in views.items() if len(v) >= PAGE_ALIGNED_MIN}


def _same(view: memoryview) -> memoryview:
    return view
