"""An asyncio training loop that checkpoints with ``await async_save`` in overlap mode.

    python examples/train_async.py --out ./checkpoints [--steps 40] [--every 10]

Overlap mode starts the staging copy and returns at once; the loop runs the
next forward and backward while the copy proceeds, and waits for
``pending.staged`` only before ``optimizer.step()`` changes the parameters.
On a GPU this hides the device-to-host copy behind compute.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import torch
from torch import nn

import async_ckpt as ac


async def train(out: Path, steps: int, every: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    saves: list[ac.PendingCheckpoint] = []
    staging: ac.PendingCheckpoint | None = None
    async with ac.AsyncCheckpointer(start=True) as ckpt:
        for step in range(1, steps + 1):
            x = torch.randn(32, 128)
            loss = (model(x) - x).pow(2).mean()
            optim.zero_grad()
            loss.backward()
            if staging is not None:
                await staging.staged  # the snapshot must be taken before the weights change
                staging = None
            optim.step()
            if step % every == 0:
                state = {"model": model, "optim": optim, "step": step}
                staging = await ckpt.async_save(state, out / f"step-{step}", overlap=True)
                saves.append(staging)
            await asyncio.sleep(0)  # a real loop would await data loading here
        for pending in saves:
            md = await pending
            s = md.stats
            print(f"committed {pending.checkpoint_id}: stall {s.stall_s:.3f}s, {s.bytes_written} bytes")

    restored = {"model": nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)), "step": 0}
    ac.load(restored, out / f"step-{steps - steps % every}", strict=False)
    print(f"loaded step {restored['step']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="./checkpoints")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(train(Path(args.out), args.steps, args.every))


if __name__ == "__main__":
    main()
