"""torchtitan step time: its own checkpointer (DCP) next to AsyncCkptCheckpointManager, in one run.

An FSDP2 (``fully_shard``) MLP on CPU, one gloo rank, trains with torchtitan's
``OptimizersContainer`` (AdamW) and LR schedulers, checkpointing every
``--interval`` steps through each manager in turn, with the calls torchtitan's
Trainer makes (``maybe_wait_for_staging`` before the optimizer step, ``save``
after it):

- ``dcp``: torchtitan's ``CheckpointManager``, its default ``async_mode="disabled"``;
- ``dcp_async``: the same with ``async_mode="async"`` (DCP's thread);
- ``async_ckpt``: ``AsyncCkptCheckpointManager`` (overlap staging, background worker).

    python benchmarks/bench_integration_torchtitan.py            # ~200 MB of state
    python benchmarks/bench_integration_torchtitan.py --quick    # seconds, proves it runs

Reported per manager (medians, seconds): a step with no save around it; the
step that saves (first save and steady ones apart); a step that runs while a
save is in flight; then every step, tagged p (plain), s (save) or i (in flight).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from async_ckpt.integrations.torchtitan import AsyncCkptCheckpointManager


def _run(config: Any, root: str, width: int, layers: int, steps: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizers = OptimizersContainer(
        OptimizersContainer.Config(
            param_groups=[
                ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-4})
            ],
            implementation="foreach",
        ),
        model_parts=[model],
    )
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
        optimizers=optimizers, training_steps=steps
    )
    ckpt = config.build(
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={},
        sd_adapter=None,
        base_folder=root,
    )
    batch = torch.randn(16, width)
    kinds: list[tuple[str, float]] = []
    try:
        for step in range(1, steps + 1):
            in_flight = ckpt.save_future is not None and not ckpt.save_future.done()
            t0 = time.perf_counter()
            model(batch).pow(2).mean().backward()
            ckpt.maybe_wait_for_staging()
            optimizers.step()
            schedulers.step()
            optimizers.zero_grad()
            saved = ckpt.save(step)
            dt = time.perf_counter() - t0
            kinds.append(("save" if saved else "in_flight" if in_flight else "plain", dt))
        t0 = time.perf_counter()
        ckpt.maybe_wait_for_saving()
        drain = time.perf_counter() - t0
    finally:
        ckpt.close()
    return {"kinds": kinds, "drain": drain}


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over every run of one manager; the first save of each run apart from the others."""
    kinds = [kd for r in runs for kd in r["kinds"]]
    firsts, steady = [], []
    for r in runs:
        saves = [dt for k, dt in r["kinds"] if k == "save"]
        firsts += saves[:1]
        steady += saves[1:]

    def median(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 4) if xs else None

    return {
        "plain_step_s": median([dt for k, dt in kinds if k == "plain"]),
        "first_save_step_s": median(firsts),
        "steady_save_step_s": median(steady),
        "step_with_save_in_flight_s": median([dt for k, dt in kinds if k == "in_flight"]),
        "steps_in_flight": sum(k == "in_flight" for k, _ in kinds),
        "final_drain_s": median([r["drain"] for r in runs]),
        "each_step": [" ".join(f"{k[0]}{dt:.3f}" for k, dt in r["kinds"]) for r in runs],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and few steps: proves it runs")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--interval", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="runs of each manager, alternated")
    args = p.parse_args()
    if args.quick:
        args.width, args.layers, args.steps, args.interval, args.rounds = 64, 2, 6, 2, 1
    state_mb = 3 * args.layers * (args.width * args.width + args.width) * 4 / 2**20  # params + AdamW's 2
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            common = {"enable": True, "interval": args.interval, "keep_latest_k": 2}
            configs = {
                "dcp": CheckpointManager.Config(folder="dcp", **common),
                "dcp_async": CheckpointManager.Config(folder="dcp_async", async_mode="async", **common),
                "async_ckpt": AsyncCkptCheckpointManager.Config(folder="ours", **common),
            }
            # Rounds alternate the managers, so a change in the machine's load hits all of them.
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
            for _ in range(args.rounds):
                for name, config in configs.items():
                    runs[name].append(_run(config, tmp, args.width, args.layers, args.steps))
            results = {name: _merge(rs) for name, rs in runs.items()}
        finally:
            dist.destroy_process_group()
    print(
        json.dumps(
            {"state_mb": round(state_mb, 1), "steps": args.steps, "interval": args.interval, **results},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
