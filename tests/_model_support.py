"""Helpers for the stateful model test (test_model_checkpointer.py).

State dicts in a family of layouts (keys, shapes and dtypes differ between
layouts), bit-exact comparison, loading a path against the model's candidate
contents, and the probes for leaked processes, descriptors and memfds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

import async_ckpt as ac

N_LAYOUTS = 12
"""More than the 8 layouts the worker keeps, so the caches must evict (and stay in step)."""

_DTYPES = (
    torch.float32,
    torch.bfloat16,
    torch.int64,
    torch.bool,
    torch.float16,
    torch.float64,
    torch.uint8,
    torch.int32,
)


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if not dtype.is_floating_point:
        return torch.randint(-(2**30), 2**30, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g).to(dtype)


def make_state(layout: int, seed: int) -> dict[str, Any]:
    """A small state dict of ``layout`` (0 .. N_LAYOUTS-1): every layout has its own
    (keys, shapes, dtypes); some share keys with others but not their shapes."""
    g = torch.Generator().manual_seed(layout * 7919 + seed)
    model: dict[str, Any] = {"w": _random((layout + 1, 3), _DTYPES[layout % len(_DTYPES)], g)}
    if layout % 2:
        model["b"] = _random((5 + layout,), _DTYPES[(layout + 3) % len(_DTYPES)], g)
    if layout % 3 == 0:
        # A non-contiguous view: the staging copy must follow its strides.
        model["t"] = _random((4, 2 + layout), torch.float32, g).t()
    if layout == 5:
        model["empty"] = torch.empty(0, 3)
    if layout % 4 == 2:
        model["layers"] = [{"k": _random((2, layout), torch.float16, g)} for _ in range(2)]
    return {"model": model, "opt": {"lr": 0.5 * seed, "name": f"opt{layout}"}, "step": seed}


def mutate(x: Any) -> None:
    """Change every tensor in place and the step (what an optimizer step does)."""
    if isinstance(x, torch.Tensor):
        with torch.no_grad():
            if x.dtype == torch.bool:
                x.logical_not_()
            elif x.numel():
                x.add_(1)
    elif isinstance(x, dict):
        for k, v in x.items():
            if k == "step":
                x[k] = v + 1
            else:
                mutate(v)
    elif isinstance(x, list):
        for v in x:
            mutate(v)


def clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clone(v) for v in x]
    return x


def blank_like(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.full_like(x, 7) if x.numel() else torch.empty_like(x)
    if isinstance(x, dict):
        return {k: blank_like(v) for k, v in x.items()}
    if isinstance(x, list):
        return [blank_like(v) for v in x]
    return None


def differences(got: Any, want: Any, where: str = "") -> list[str]:
    """Where ``got`` differs from ``want``, bit for bit (empty when equal)."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
            return [f"{where}: {_describe(got)} != {_describe(want)}"]
        a = got.contiguous().reshape(-1).view(torch.uint8)
        b = want.contiguous().reshape(-1).view(torch.uint8)
        return [] if torch.equal(a, b) else [f"{where}: values differ"]
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{where}: keys {sorted(got) if isinstance(got, dict) else got!r} != {sorted(want)}"]
        return [d for k in want for d in differences(got[k], want[k], f"{where}.{k}" if where else str(k))]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where}: {got!r} != list of {len(want)}"]
        return [
            d
            for i, (g, w) in enumerate(zip(got, want, strict=True))
            for d in differences(g, w, f"{where}.{i}")
        ]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def _describe(x: Any) -> str:
    return f"{x.dtype}{list(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)


def match_on_disk(path: Path, candidates: list[dict[str, Any] | None]) -> tuple[int | None, str]:
    """Which candidate ``path`` holds: its index (the first that loads bit-exact), or
    None and what was found. ``None`` among the candidates means "no committed checkpoint"."""
    try:
        ac.read_metadata(path)
    except ac.CheckpointError as exc:
        if None in candidates:
            return candidates.index(None), ""
        return None, f"no committed checkpoint ({exc})"
    problems = []
    for i, want in enumerate(candidates):
        if want is None:
            continue
        target = blank_like(want)
        try:
            ac.load(target, path)
        except ac.CheckpointError as exc:
            problems.append(f"candidate {i}: load failed: {exc}")
            continue
        diff = differences(target, want)
        if not diff:
            return i, ""
        problems.append(f"candidate {i}: " + "; ".join(diff[:4]))
    return None, "a committed checkpoint that is none of the candidates: " + " | ".join(problems)


# ------------------------------------------------------------------ leaks


def fd_targets() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used, closed by now
            pass
    return out


def memfds() -> list[str]:
    return [t for t in fd_targets() if "memfd:" in t]


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def settle(probe: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll until ``probe`` holds: threads and reaped processes finish closing a little later."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class ErrorLog(logging.Handler):
    """Errors the library logs on the trainer side (e.g. a pending resolved twice)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))
