"""Pausing Python's cyclic garbage collector around the hot paths.

A save or load of thousands of tensors allocates hundreds of thousands of
small objects; each allocation burst can trigger a full collection that
walks every object the training process holds (modules, optimizer state,
autograd graphs): measured here at ~0.15 s per save for 2,872 tensors. Our
objects are freed by reference counting, so pausing the collector for the
duration loses nothing; it runs again as usual afterwards.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["gc_paused"]


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
