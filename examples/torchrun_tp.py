"""Tensor parallel + data parallel on CPU (gloo), checkpointed, then resumed on fewer ranks.

    torchrun --nproc-per-node 4 examples/torchrun_tp.py --out ./tp-ckpt            # dp=2 x tp=2, saves
    torchrun --nproc-per-node 2 examples/torchrun_tp.py --out ./tp-ckpt --resume   # tp=2, loads

The first run trains a small MLP split column/row-wise over the tp dimension
and replicated over dp, and saves it in the background with AsyncCheckpointer:
replicas are written once. The second run builds the model on the meta device
with a different mesh, loads (resharding 4 -> 2 ranks), and checks the values
against the checkpoint read into plain full tensors.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import async_ckpt as ac

DIM, HIDDEN, STEPS = 64, 256, 5


def build(tp_mesh: object, device: str = "cpu") -> nn.Module:
    with torch.device(device):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DIM))
    return parallelize_module(model, tp_mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def train_and_save(out: str, world: int) -> None:
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    model = build(mesh["tp"])
    optim = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(100 + mesh["dp"].get_local_rank())
    with ac.AsyncCheckpointer(start=True) as ckpt:
        for _ in range(STEPS):
            x = torch.randn(16, DIM, generator=gen)
            loss = (model(x) - x).pow(2).mean()
            optim.zero_grad()
            loss.backward()
            for p in model.parameters():  # data parallel: average gradients over dp
                assert p.grad is not None and isinstance(p.grad, DTensor)
                dist.all_reduce(p.grad.to_local(), group=mesh["dp"].get_group())
                p.grad.to_local().div_(mesh["dp"].size())
            optim.step()
        pending = ckpt.save({"model": model, "optim": optim, "step": STEPS}, out)
    md = pending.result()
    if dist.get_rank() == 0:
        print(f"saved step {STEPS} from {world} ranks: {len(md.tensors)} tensors, {len(md.files)} files")


def resume(out: str, world: int) -> None:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model = build(mesh, device="meta")
    state = {"model": model.state_dict(), "step": 0}
    ac.load(state, out)
    model.load_state_dict(state["model"], assign=True)
    full = {k: torch.empty(tuple(v.shape), dtype=v.dtype) for k, v in model.state_dict().items()}
    ac.load({"model": full}, out, strict=False, process_group=None)
    for k, v in model.state_dict().items():
        if not torch.equal(v.full_tensor(), full[k]):
            raise SystemExit(f"rank {dist.get_rank()}: {k} differs after resharding")
    if dist.get_rank() == 0:
        print(f"resumed step {state['step']} on {world} ranks; every parameter matches")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="./tp-ckpt")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()  # torchrun's, outlives the group
    try:
        if args.resume:
            resume(args.out, world)
        else:
            if world % 2:
                raise SystemExit("run with an even number of ranks (dp x tp=2)")
            train_and_save(args.out, world)
    finally:
        # Let every rank finish its last collective before any tears its group down,
        # and none exit before all have: a rank whose gloo peers close their sockets
        # while it is still shutting down can abort ("terminate called without an
        # active exception"; 4 runs in 15 on a busy 2-core machine).
        dist.barrier()
        dist.destroy_process_group()
        store.add("torchrun_tp/closed", 1)
        deadline = time.monotonic() + 60
        while store.add("torchrun_tp/closed", 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)


if __name__ == "__main__":
    main()
