"""Lightning Trainer step time: its default checkpointing next to ``AsyncCkptIO``, in one run.

An MLP (``--layers`` x ``--hidden``^2, Adam: about 12 bytes of state per
parameter) trains on random data on CPU, ``ModelCheckpoint`` saving every
``--save-every`` steps to a new file, first with Lightning's default
``TorchCheckpointIO`` (``torch.save``, blocking), then with
``Trainer(plugins=[AsyncCkptIO()])``. A callback times every step (one batch
start to the next, so a save made at a batch's end lands in that step) and
notes whether one of our saves was still in flight (its ``metadata.json`` not
yet committed) when the step began.

    python benchmarks/bench_integration_lightning.py            # ~300 MB of state
    python benchmarks/bench_integration_lightning.py --quick    # seconds, proves it runs

Reported (medians, seconds): a step with no save around it; the step that
pays for a save (default: the whole save; ours: the stall to stage it, the
first save apart from steady ones); ours, a step run while a save is in flight.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from async_ckpt.integrations.lightning import AsyncCkptIO


class _MLP(L.LightningModule):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(*(torch.nn.Linear(hidden, hidden) for _ in range(layers)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class _StepClock(Callback):
    """Per step: seconds from this batch's start to the next one's, and whether a save was in flight."""

    def __init__(self, saved_dirs: list[Path]) -> None:
        self.saved_dirs = saved_dirs
        self.steps: list[tuple[float, bool]] = []  # (seconds, a save in flight at its start)
        self._t: float | None = None
        self._in_flight = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t is not None:
            self.steps.append((now - self._t, self._in_flight))
        self._t = now
        self._in_flight = any(not (p / "metadata.json").exists() for p in self.saved_dirs)


class _TimedIO(AsyncCkptIO):
    def __init__(self, saved: list[Path], stalls: list[float]) -> None:
        super().__init__()
        self.saved, self.stalls = saved, stalls

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        t0 = time.perf_counter()
        super().save_checkpoint(checkpoint, path, storage_options)
        self.stalls.append(time.perf_counter() - t0)
        self.saved.append(Path(path))


def _run(mode: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(args.steps * args.batch, args.hidden)), batch_size=args.batch)
    saved: list[Path] = []
    stalls: list[float] = []
    plugins = [_TimedIO(saved, stalls)] if mode == "async_ckpt" else []
    clock = _StepClock(saved if mode == "async_ckpt" else [])
    every = ModelCheckpoint(root / mode, every_n_train_steps=args.save_every, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=plugins,
        callbacks=[every, clock],
        default_root_dir=str(root),
    )
    model = _MLP(args.hidden, args.layers)
    state_mb = sum(p.numel() for p in model.parameters()) * 12 / 1e6
    trainer.fit(model, data)
    # Batch i ends with global step i + 1: ModelCheckpoint saves at its end, inside step i's interval.
    every_n, rows = args.save_every, clock.steps
    save_steps = [s for i, (s, _) in enumerate(rows) if (i + 1) % every_n == 0]
    quiet = [s for i, (s, fl) in enumerate(rows) if (i + 1) % every_n != 0 and not fl and i >= 2]
    in_flight = [s for i, (s, fl) in enumerate(rows) if (i + 1) % every_n != 0 and fl]
    med = statistics.median
    return {
        "mode": mode,
        "state_mb": round(state_mb),
        "quiet_step_s": med(quiet) if quiet else None,
        "save_step_s": med(save_steps) if save_steps else None,
        "first_save_step_s": save_steps[0] if save_steps else None,
        "steady_save_step_s": med(save_steps[1:]) if len(save_steps) > 1 else None,
        "first_stall_s": stalls[0] if stalls else None,
        "steady_stall_s": med(stalls[1:]) if len(stalls) > 1 else None,
        "in_flight_step_s": med(in_flight) if in_flight else None,
        "in_flight_steps": len(in_flight),
        "saves": len(save_steps),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--dir", type=Path, default=None, help="where to save (default: a temporary directory)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="a tiny model and few steps: proves it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.steps, args.save_every = 256, 2, 12, 4
    warnings.filterwarnings("ignore", module="lightning")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = [_run(mode, args, Path(tmp)) for mode in ("default", "async_ckpt")]
    keys = [k for k in results[0] if k != "mode"]
    print(f"\nLightning, step time with a save every {args.save_every} steps (seconds, medians)")
    print(f"{'':22}" + "".join(f"{r['mode']:>14}" for r in results))
    for k in keys:
        cells = "".join(f"{'-' if r[k] is None else round(r[k], 4):>14}" for r in results)
        print(f"{k:22}{cells}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
