"""The process's random number generators as a state dict entry, and back.

Every state here saves without pickle: Python's state is a tuple of ints,
numpy's a tuple holding a small array, torch's are uint8 tensors.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """Python's, numpy's, torch's CPU and (once initialised) every CUDA device's generator."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.get_rng_state(),
    }
    # Asking an uninitialised CUDA for its state would initialise it: a CPU run leaves it alone.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def restore_rng(states: dict[str, Any]) -> None:
    """Set every generator ``states`` holds (as ``capture_rng`` made it)."""
    random.setstate(_as_tuples(states["python"]))
    np.random.set_state(tuple(states["numpy"]))
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))


def _as_tuples(value: Any) -> Any:
    # random.setstate insists on tuples all the way down.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value
