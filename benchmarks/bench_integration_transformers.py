"""transformers.Trainer step time: its own checkpointing next to async_ckpt's, in one run.

A GPT-2 built from a config (no download) trains on random tokens on CPU,
checkpointing every ``--save-every`` steps, first with the stock ``Trainer``
(``torch.save``/safetensors, blocking), then with ``AsyncCheckpointTrainer``.
A callback times every optimizer step (one ``on_step_end`` to the next, so a
blocking save lands in the step after it) and notes whether an async save
was in flight when the step began.

    python benchmarks/bench_integration_transformers.py            # ~280 MB of state
    python benchmarks/bench_integration_transformers.py --quick    # seconds, proves it runs

Reported (medians, seconds): a step with no save around it; the step that
pays for a save (stock: the whole save; ours: the stall to stage it, first
save and steady ones apart); the ``_save_checkpoint`` call itself (how long
the loop is held, free of step-time noise); ours, a step run while the save
is in flight, and the worker's CPU seconds over all saves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import psutil
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from async_ckpt import AsyncCheckpointer
from async_ckpt.integrations.transformers import AsyncCheckpointTrainer


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _StepClock(TrainerCallback):
    """Per step: seconds since the previous step ended, and whether an async save was in flight."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.last_end: float | None = None
        self.in_flight_at_begin = False
        self.steps: list[tuple[int, float, bool]] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        pending = getattr(self.trainer, "_pending_saves", [])
        self.in_flight_at_begin = any(not p.done() for p in pending)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        now = time.perf_counter()
        if self.last_end is not None:
            self.steps.append((state.global_step, now - self.last_end, self.in_flight_at_begin))
        self.last_end = now


class _TimedSave:
    """Wall time of each ``_save_checkpoint``: how long the training loop is held by a save."""

    save_block_s: list[float]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        t0 = time.perf_counter()
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        self.__dict__.setdefault("save_block_s", []).append(time.perf_counter() - t0)


class _TimedStock(_TimedSave, Trainer):
    pass


class _TimedOurs(_TimedSave, AsyncCheckpointTrainer):
    pass


def _model(a: argparse.Namespace) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=a.layers,
        n_embd=a.width,
        n_head=8,
        vocab_size=a.vocab,
        n_positions=a.seq,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(cfg)


def _run(cls: type[Trainer], out: Path, a: argparse.Namespace) -> dict[str, Any]:
    clock = _StepClock()
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=a.steps,
        save_steps=a.save_every,
        save_strategy="steps",
        per_device_train_batch_size=a.batch,
        learning_rate=1e-4,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_total_limit=2,
    )
    data = _Tokens(a.steps * a.batch, a.seq, a.vocab)
    ckpt = None
    if issubclass(cls, AsyncCheckpointTrainer):
        # Our own checkpointer, so its worker's CPU time can be read before it is closed.
        ckpt = AsyncCheckpointer(max_in_flight=1, start=True)
        trainer = cls(model=_model(a), args=args, train_dataset=data, async_checkpointer=ckpt)
    else:
        trainer = cls(model=_model(a), args=args, train_dataset=data)
    trainer.add_callback(clock)
    clock.trainer = trainer
    n_bytes = sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())
    trainer.train()
    worker_cpu_s = None
    if ckpt is not None:
        assert ckpt.worker_pid is not None
        times = psutil.Process(ckpt.worker_pid).cpu_times()
        worker_cpu_s = round(times.user + times.system, 2)
        ckpt.close()
    # The step after a save step pays for a blocking save (saves run after on_step_end).
    saved_after = {s + 1 for s in range(a.save_every, a.steps + 1, a.save_every)}
    save_steps = [dt for step, dt, _ in clock.steps if step in saved_after]
    plain = [dt for step, dt, busy in clock.steps if step not in saved_after and not busy]
    busy = [dt for step, dt, busy in clock.steps if step not in saved_after and busy]
    opt_bytes = sum(
        t.numel() * t.element_size()
        for st in trainer.optimizer.state_dict()["state"].values()
        for t in st.values()
        if isinstance(t, torch.Tensor)
    )
    stats = [
        {"stall_s": round(st.stall_s, 4), "stage_s": round(st.stage_s, 4), "write_s": round(st.write_s, 4)}
        for st in getattr(trainer, "async_save_stats", [])
    ]
    return {
        "save_stats": stats,
        "save_call_s": [round(x, 4) for x in trainer.__dict__.get("save_block_s", [])],
        "worker_cpu_s": worker_cpu_s,
        "state_mb": round((n_bytes + opt_bytes) / 2**20, 1),
        "step_no_save_s": _med(plain),
        "step_with_save_s": save_steps,
        "step_save_in_flight_s": _med(busy),
        "steps_in_flight": len(busy),
    }


def _med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: proves the script runs")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args()
    a.layers, a.width, a.vocab, a.seq, a.batch = (6, 512, 8192, 64, 2)
    if a.quick:
        a.layers, a.width, a.vocab, a.seq, a.batch, a.steps, a.save_every = (1, 64, 256, 16, 2, 8, 3)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    results: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "steps": a.steps,
        "save_every": a.save_every,
    }
    with tempfile.TemporaryDirectory(prefix="bench_hf_") as tmp:
        results["stock"] = _run(_TimedStock, Path(tmp) / "stock", a)
        results["async_ckpt"] = _run(_TimedOurs, Path(tmp) / "ours", a)
    stock, ours = results["stock"], results["async_ckpt"]
    saves_ours = ours["step_with_save_s"]
    print(f"state {stock['state_mb']} MB (model + AdamW), {a.steps} steps, save every {a.save_every}")
    print(f"{'':32}{'stock Trainer':>16}{'async_ckpt':>14}")
    print(f"{'step, no save around it':32}{stock['step_no_save_s']!s:>16}{ours['step_no_save_s']!s:>14}")
    stock_saves = stock["step_with_save_s"]
    print(f"{'step paying for a save (median)':32}{_med(stock_saves)!s:>16}{_med(saves_ours)!s:>14}")
    print(f"{'  first save':32}{_first(stock)!s:>16}{_first(ours)!s:>14}")
    print(f"{'  steady saves (median)':32}{_med(stock_saves[1:])!s:>16}{_med(saves_ours[1:])!s:>14}")
    stock_calls, our_calls = stock["save_call_s"], ours["save_call_s"]
    print(f"{'_save_checkpoint call, first':32}{_head(stock_calls)!s:>16}{_head(our_calls)!s:>14}")
    print(f"{'  steady (median)':32}{_med(stock_calls[1:])!s:>16}{_med(our_calls[1:])!s:>14}")
    print(f"{'step while save in flight':32}{'-':>16}{ours['step_save_in_flight_s']!s:>14}")
    print(f"{'  (steps measured)':32}{'':>16}{ours['steps_in_flight']:>14}")
    print(f"async_ckpt worker CPU time, all saves: {ours['worker_cpu_s']}s")
    for st in ours["save_stats"]:
        print(f"  async_ckpt save: stall {st['stall_s']}s stage {st['stage_s']}s write {st['write_s']}s")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


def _head(xs: list[float]) -> float | None:
    return round(xs[0], 4) if xs else None


def _first(r: dict[str, Any]) -> float | None:
    return round(r["step_with_save_s"][0], 4) if r["step_with_save_s"] else None


if __name__ == "__main__":
    main()
