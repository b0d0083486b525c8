"""Crash and resume with ``CheckpointManager``.

    python examples/resume.py --root ./run --steps 12 --crash-at 8   # dies at step 8
    python examples/resume.py --root ./run --steps 12                # resumes, finishes

A tiny model trains on generated data; every ``--every`` steps the manager
saves ``<root>/step-<n>`` in the background (keeping the newest two, plus
every tenth step). With ``--crash-at K`` the process kills itself with
``os._exit(1)`` at step K: no cleanup, no atexit, like a lost node. The next
run restores the newest committed step (model, optimizer, data RNG and step
counter) and carries on; the final parameter digest equals that of a run that
never crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from typing import Any

import torch
from torch import nn

import async_ckpt as ac


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), torch.Generator().manual_seed(1)


def train_step(model: nn.Module, optim: torch.optim.Optimizer, data: torch.Generator) -> float:
    x = torch.randn(32, 16, generator=data)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    optim.zero_grad()
    loss.backward()
    optim.step()
    return loss.item()


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def state_of(
    model: nn.Module, optim: torch.optim.Optimizer, data: torch.Generator, step: int
) -> dict[str, Any]:
    return {"model": model, "optim": optim, "data_rng": data.get_state(), "step": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder for step-<n> checkpoints")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3, help="save every N steps")
    parser.add_argument("--crash-at", type=int, default=None, help="kill the process at this step")
    args = parser.parse_args()

    model, optim, data = build()
    with ac.CheckpointManager(args.root, keep_last=2, keep_every=10) as manager:
        start = 0
        if manager.latest() is not None:
            state = state_of(model, optim, data, 0)
            start = manager.restore(state)
            data.set_state(state["data_rng"])
            print(f"resumed from step {start}", flush=True)
        else:
            print("no checkpoint yet: starting from scratch", flush=True)

        for step in range(start + 1, args.steps + 1):
            loss = train_step(model, optim, data)
            if step == args.crash_at:
                # Wait for the saves in flight so that the demo's outcome is predictable;
                # without this, a save still being written is simply lost (never half-read).
                manager.wait()
                print(f"step {step}: crashing (committed: {manager.steps()})", flush=True)
                os._exit(1)
            if step % args.every == 0 or step == args.steps:
                manager.save(step, state_of(model, optim, data, step))
                print(f"step {step}: loss {loss:.4f}, checkpoint staged", flush=True)
    # Leaving the block waited for every save and its retention.
    print(f"finished at step {args.steps}; kept steps {manager.steps()}; digest {digest(model)}", flush=True)


if __name__ == "__main__":
    main()
