"""The main job: a plain training loop that checkpoints in the background.

    python examples/train_sync.py --out ./checkpoints [--steps 60] [--every 20]

Every ``--every`` steps the loop hands its state to an ``AsyncCheckpointer``:
the call returns as soon as the tensors are copied into staging buffers, and a
background process writes and commits ``<out>/step-<n>`` while training goes
on. At the end the newest checkpoint is loaded into a fresh model and
optimizer, and checked against the live ones.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from torch import nn

import async_ckpt as ac


def build(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="./checkpoints", help="folder for step-<n> checkpoints")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)

    model, optim = build()
    data = torch.Generator().manual_seed(1)
    pending = []
    with ac.AsyncCheckpointer(start=True) as ckpt:
        for step in range(1, args.steps + 1):
            x = torch.randn(64, 256, generator=data)
            loss = (model(x) - x).pow(2).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
            if step % args.every == 0:
                t0 = time.perf_counter()
                state = {"model": model, "optim": optim, "step": step, "rng": data.get_state()}
                pending.append(ckpt.save(state, out / f"step-{step}"))
                staged = time.perf_counter() - t0
                print(f"step {step}: loss {loss.item():.4f}, checkpoint staged in {staged:.3f}s")
    # Leaving the block waited for every save; each pending now holds its metadata.
    for p in pending:
        md = p.result()
        print(f"committed {p.checkpoint_id}: {len(md.tensors)} tensors, {md.stats.bytes_written} bytes")

    last = args.steps - args.steps % args.every
    fresh_model, fresh_optim = build(seed=123)
    restored = {"model": fresh_model, "optim": fresh_optim, "step": 0, "rng": torch.Generator().get_state()}
    ac.load(restored, out / f"step-{last}")
    same = all(torch.equal(a, b) for a, b in zip(fresh_model.parameters(), model.parameters(), strict=True))
    print(f"resumed from step {restored['step']}: parameters match the live model: {same}")
    if not same:
        raise SystemExit("restored parameters differ from the live model")


if __name__ == "__main__":
    main()
