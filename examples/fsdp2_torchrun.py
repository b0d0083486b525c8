"""FSDP2 (``fully_shard``) on CPU (gloo), saved in the background, resumed on a different world size.

    torchrun --standalone --nproc-per-node 4 examples/fsdp2_torchrun.py --out ./fsdp2-ckpt --steps 8
    torchrun --standalone --nproc-per-node 2 examples/fsdp2_torchrun.py --out ./fsdp2-ckpt --steps 12 --resume

The first run shards a small MLP over 4 ranks with ``fully_shard``, trains it
with AdamW and saves every ``--every`` steps (default 4) with
``AsyncCheckpointer.save(..., overlap=True)``: the staging copy of the sharded
model and optimizer state runs while the next forward and backward do, and the
loop waits for ``pending.staged`` only before ``optimizer.step()`` changes
them. The state comes from ``get_model_state_dict`` / ``get_optimizer_state_dict``
(``torch.distributed.checkpoint.state_dict``): DTensor shards keyed by
parameter name, so the checkpoint does not depend on the world size.

The second run shards the same model over 2 ranks, loads the newest
checkpoint into freshly made state dicts (resharding 4 -> 2 ranks), puts it
in place with ``set_model_state_dict`` / ``set_optimizer_state_dict``, and
trains on to ``--steps``. Both runs print a SHA-256 of the full (gathered)
model and optimizer state: the one printed after the load equals the one
printed when that step was saved.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import async_ckpt as ac

DIM, HIDDEN, BATCH = 32, 128, 16


def build(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # every rank starts from the same weights, as FSDP2 expects
    model = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
    model.append(nn.Linear(HIDDEN, DIM))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    # The global batch depends on the step only, so a resumed run on any number
    # of ranks sees the same data; each rank takes its slice.
    x = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(step))
    return x.chunk(world)[rank]


def checksum(model: nn.Module, optim: torch.optim.Optimizer) -> str:
    """SHA-256 of the full model and optimizer state (collective: gathers the shards)."""
    full = StateDictOptions(full_state_dict=True)
    state: dict[str, Any] = {"model": get_model_state_dict(model, options=full)}
    state["optim"] = get_optimizer_state_dict(model, optim, options=full)
    digest = hashlib.sha256()

    def feed(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                feed(f"{key}.{k}", value[k])
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                feed(f"{key}.{i}", v)
        elif isinstance(value, torch.Tensor):
            t = value.detach().contiguous().reshape(-1)
            digest.update(f"{key}:{t.dtype}:{tuple(value.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{key}={value!r}".encode())

    feed("", state)
    return digest.hexdigest()[:16]


def train(args: argparse.Namespace, rank: int, world: int) -> None:
    model, optim = build(world)
    start = 0
    if args.resume:
        # Fresh state dicts shaped for this world size: DTensor shards of 2 ranks
        # where the checkpoint holds shards of 4. get_optimizer_state_dict makes
        # the optimizer's state (zeros) first, so every tensor has a target.
        state: dict[str, Any] = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optim),
            "step": 0,
        }
        start = ac.CheckpointManager(args.out).restore(state)  # newest committed step
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optim, state["optim"])
        digest = checksum(model, optim)
        if rank == 0:
            print(f"resumed step {start} on {world} ranks: state checksum {digest}", flush=True)

    saves: list[ac.PendingCheckpoint] = []
    staging: ac.PendingCheckpoint | None = None
    # start=True starts the worker now, so the first save does not pay for it.
    with ac.AsyncCheckpointer(start=True) as ckpt:
        for step in range(start + 1, args.steps + 1):
            x = batch(step, rank, world)
            loss = (model(x) - x).pow(2).mean()
            optim.zero_grad()
            loss.backward()
            if staging is not None:
                staging.staged.wait()  # the snapshot must be taken before the weights change
                staging = None
            optim.step()
            if step % args.every == 0 or step == args.steps:
                state = {
                    "model": get_model_state_dict(model),
                    "optim": get_optimizer_state_dict(model, optim),
                    "step": step,
                }
                staging = ckpt.save(state, Path(args.out) / f"step-{step:08d}", overlap=True)
                saves.append(staging)
                digest = checksum(model, optim)  # reads only: the staging copy may run meanwhile
                if rank == 0:
                    print(f"saving step {step} from {world} ranks: state checksum {digest}", flush=True)
        for pending in saves:
            stats = pending.result().stats
            if rank == 0 and stats is not None:
                print(f"committed {pending.checkpoint_id}: stall {stats.stall_s * 1e3:.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="./fsdp2-ckpt")
    parser.add_argument("--steps", type=int, default=8, help="train up to this step")
    parser.add_argument("--every", type=int, default=4, help="save every N steps (and at the last)")
    parser.add_argument("--resume", action="store_true", help="load the newest checkpoint under --out")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()  # torchrun's, outlives the group
    try:
        train(args, rank, world)
    finally:
        # As in torchrun_tp.py: no rank tears its gloo group down while a peer
        # may still be in a collective, and none exits before all have.
        dist.barrier()
        dist.destroy_process_group()
        store.add("fsdp2_torchrun/closed", 1)
        deadline = time.monotonic() + 60
        while store.add("fsdp2_torchrun/closed", 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)


if __name__ == "__main__":
    main()
