"""The synthetic training step of ``benchmarks/bench_overhead.py`` costs the same whatever its length.

Its matmul chain must keep its values in the normal range: values that decay into
denormals make each matmul some 200x slower, so a step calibrated to 1.5x a memcpy
took 9 s on a machine whose faster matmuls gave it more than ~24 of them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench_overhead() -> object:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # its own imports (_common)
    spec = importlib.util.spec_from_file_location("_bench_overhead", BENCH / "bench_overhead.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_a_long_matmul_chain_stays_in_the_normal_range() -> None:
    mod = _bench_overhead()
    trainer = mod.Trainer({"w": torch.zeros(4)}, n_matmuls=80)  # type: ignore[attr-defined]
    c = trainer.compute()
    assert bool(torch.isfinite(c).all())
    smallest_normal = torch.finfo(torch.float32).tiny
    spread = float(c.abs().mean())
    assert 1e-3 < spread < 1e3, spread
    assert float((c.abs() < smallest_normal).float().mean()) < 1e-3, "denormal values in the chain"
