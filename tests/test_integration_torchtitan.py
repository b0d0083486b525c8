"""torchtitan backend: AsyncCkptCheckpointManager against the real torchtitan package, on gloo ranks.

The pieces are torchtitan's own: an FSDP2 (``fully_shard``) CPU model behind
``ModelWrapper``, ``OptimizersContainer``, ``LRSchedulersContainer`` and a
``ParallelAwareDataloader`` (its state has one key per data-parallel rank). The
loop calls the manager where torchtitan's ``Trainer`` does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks
from torch import nn
from torch.utils.data import IterableDataset

pytest.importorskip("torchtitan")
pytest.importorskip("torchdata")

from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.optimizer import (
    LRSchedulersContainer,
    OptimizersContainer,
)
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.protocols.state_dict_adapter import BaseStateDictAdapter

from async_ckpt.integrations.torchtitan import HF_EXPORT_PREFIX, AsyncCkptCheckpointManager

pytestmark = pytest.mark.slow

DIM = 16


class _Data(IterableDataset):  # type: ignore[type-arg]
    """A per-rank stream: where a resumed loader picks up shows in the losses."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __iter__(self) -> Any:
        for i in range(10_000):
            yield torch.randn(DIM, generator=torch.Generator().manual_seed(1000 * self.rank + i))


class _TrainState:
    """What torchtitan's Trainer saves as ``train_state``, plus the RNG state."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen, "rng": torch.get_rng_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.ntokens_seen = int(sd["ntokens_seen"])
        torch.set_rng_state(sd["rng"])


class _Adapter(BaseStateDictAdapter):
    """A model's Hugging Face names: ``0.weight`` -> ``model.layers.0.weight``."""

    def __init__(self) -> None:
        self.fqn_to_index_mapping = None
        self.hf_assets_path = None

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {f"model.layers.{k}": v for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return {k.removeprefix("model.layers."): v for k, v in hf_state_dict.items()}

    def get_hf_storage_reader(self, path: str, from_quantized: bool = False) -> Any:
        raise NotImplementedError


class _Run:
    def __init__(self, rank: int, world: int, root: str, config: Any) -> None:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, DIM))
        fully_shard(self.model[0])
        fully_shard(self.model[2])
        fully_shard(self.model)
        self.optimizers = OptimizersContainer(
            OptimizersContainer.Config(
                param_groups=[
                    ParamGroupConfig(
                        pattern=".*",
                        optimizer_name="AdamW",
                        optimizer_kwargs={"lr": 1e-2, "weight_decay": 0.1},
                    )
                ],
                implementation="for-loop",
            ),
            model_parts=[self.model],
        )
        self.lr_schedulers = LRSchedulersContainer.Config(warmup_steps=3).build(
            optimizers=self.optimizers, training_steps=40
        )
        self.dataloader = ParallelAwareDataloader(
            _Data(rank), dp_rank=rank, dp_world_size=world, batch_size=2
        )
        self.batches: Any = None  # iterated after load, as torchtitan's Trainer does
        self.train_state = _TrainState()
        self.ckpt = config.build(
            dataloader=self.dataloader,
            model_parts=[self.model],
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self.train_state},
            sd_adapter=_Adapter(),
            base_folder=root,
        )
        self.saved: list[Any] = []

    def step(self, last_step: bool = False, save: bool = True) -> float:
        # The order of torchtitan's Trainer.train_step and train loop.
        if self.batches is None:
            self.batches = iter(self.dataloader)
        batch = next(self.batches)
        loss = self.model(batch).pow(2).mean() + 0.0 * torch.rand(())
        loss.backward()
        self.ckpt.maybe_wait_for_staging()
        self.optimizers.step()
        self.lr_schedulers.step()
        self.optimizers.zero_grad()
        self.train_state.step += 1
        self.train_state.ntokens_seen += batch.numel()
        if save and self.ckpt.save(self.train_state.step, last_step=last_step) and self.ckpt.save_future:
            self.saved.append(self.ckpt.save_future)
        return float(loss)

    def snapshot(self) -> dict[str, Any]:
        """This rank's view: local shards, flat optimizer state, scheduler, loader, train state."""
        return {
            "model": {k: v.to_local().clone() for k, v in self.model.state_dict().items()},
            "optim": _clone(self.optimizers.state_dict()),
            "lr": self.lr_schedulers.state_dict(),
            "train": _clone(self.train_state.state_dict()),
        }

    def full(self) -> dict[str, torch.Tensor]:
        """Whole tensors (collective): model and optimizer state."""
        out = {f"model.{k}": v.full_tensor() for k, v in self.model.state_dict().items()}
        for k, v in self.optimizers.state_dict().items():
            if hasattr(v, "full_tensor"):
                out[f"optim.{k}"] = v.full_tensor()
        return out


def _clone(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    if hasattr(tree, "to_local"):
        return tree.to_local().clone()
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    return tree


def _without_rng(snapshot: dict[str, Any]) -> dict[str, Any]:
    # A resumed loader draws its base seed from the RNG when first iterated: the
    # RNG matches at the load (checked there), not after the loader restarts.
    snapshot["train"].pop("rng")
    return snapshot


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, path


def _ours(**kw: Any) -> AsyncCkptCheckpointManager.Config:
    return AsyncCkptCheckpointManager.Config(**{"enable": True, "folder": "ckpt", "interval": 2, **kw})


def _steps_on_disk(root: str) -> list[str]:
    return sorted(p.name for p in (Path(root) / "ckpt").iterdir() if not p.name.startswith("."))


# --------------------------------------------------------------- 2 ranks: save, resume


def _save_and_resume(rank: int, world: int, root: str) -> dict[str, Any]:
    run = _Run(rank, world, root, _ours(keep_latest_k=2))
    assert run.ckpt.load() is False  # a fresh start
    for _ in range(6):
        run.step()  # saves at steps 2, 4 and 6
    run.ckpt.maybe_wait_for_saving()
    at_6 = run.snapshot()
    stalls = [f.result().stats.stall_s for f in run.saved]
    losses = [run.step() for _ in range(2)]  # 7, 8 (a save)
    full_at_8 = run.full()
    losses.append(run.step())
    run.ckpt.close()
    final = run.snapshot()
    on_disk = _steps_on_disk(root)

    fresh = _Run(rank, world, root, _ours(keep_latest_k=2))
    torch.manual_seed(1234)  # the resumed RNG must come from the checkpoint
    assert fresh.ckpt.load(step=6) is True
    _assert_same(at_6, fresh.snapshot())
    resumed = [fresh.step() for _ in range(3)]
    fresh.ckpt.close()
    assert resumed == losses
    _assert_same(_without_rng(final), _without_rng(fresh.snapshot()))
    return {"stalls": stalls, "on_disk": on_disk, "full_at_8": _to_numpy(full_at_8) if rank == 0 else None}


def _to_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    # Tensors sent between processes would be shared through the (exiting) sender.
    return {k: v.numpy() for k, v in tensors.items()}


def _resume_one_rank(rank: int, world: int, root: str, expected: dict[str, Any]) -> None:
    run = _Run(rank, world, root, _ours(keep_latest_k=2, exclude_from_loading=["dataloader"]))
    assert run.ckpt.load() is True  # the latest: step 8 saved by two ranks
    assert run.train_state.step == 8 and run.lr_schedulers.state_dict() == {"last_epoch": 8}
    _assert_same({k: torch.from_numpy(v) for k, v in expected.items()}, run.full())
    run.ckpt.close()


def test_torchtitan_save_resume_two_ranks_then_one(tmp_path: Path) -> None:
    results = run_ranks(2, _save_and_resume, str(tmp_path), timeout=300)
    stalls = results[0]["stalls"]
    print(
        f"\ntorchtitan backend, rank 0 save stalls: first {stalls[0] * 1e3:.1f} ms, steady "
        f"{', '.join(f'{s * 1e3:.1f}' for s in stalls[1:])} ms"
    )
    # keep_latest_k=2 through async_ckpt's retention, steps named as async_ckpt names them.
    assert results[0]["on_disk"] == ["step-00000006", "step-00000008"]
    run_ranks(1, _resume_one_rank, str(tmp_path), results[0]["full_at_8"], timeout=300)


# ------------------------------------------------- torchtitan's DCP checkpoints resume


def _dcp_then_ours(rank: int, world: int, root: str) -> None:
    dcp_config = CheckpointManager.Config(enable=True, folder="ckpt", interval=2, keep_latest_k=0)
    run = _Run(rank, world, root, dcp_config)
    for _ in range(4):
        run.step()  # torchtitan's own manager writes step-2 and step-4 (DCP)
    at_4 = run.snapshot()
    losses = [run.step(save=False) for _ in range(2)]  # what the resumed run must repeat
    final = run.snapshot()
    run.ckpt.close()
    dist.barrier()
    assert {"step-2", "step-4"} <= set(_steps_on_disk(root))

    torch.manual_seed(99)
    ours = _Run(rank, world, root, _ours(keep_latest_k=0))
    assert ours.ckpt.load() is True
    _assert_same(at_4, ours.snapshot())
    resumed = [ours.step() for _ in range(2)]  # step 6 is saved by us
    ours.ckpt.close()
    assert resumed == losses
    _assert_same(_without_rng(final), _without_rng(ours.snapshot()))
    dist.barrier()
    # The DCP steps are checkpoints, not leftovers of interrupted saves: retention keeps them.
    assert _steps_on_disk(root) == ["step-00000006", "step-2", "step-4"]

    # A new run (empty folder) seeded from the DCP step by initial_load_path: the model only.
    seeded = _Run(rank, world, root, _ours(folder="seeded", initial_load_path=f"{root}/ckpt/step-4"))
    assert seeded.ckpt.load() is True
    _assert_same(at_4["model"], seeded.snapshot()["model"])
    assert seeded.train_state.step == 0 and seeded.lr_schedulers.state_dict() == {"last_epoch": 0}
    seeded.ckpt.close()


def test_torchtitan_dcp_checkpoint_resumes_through_ours(tmp_path: Path) -> None:
    run_ranks(2, _dcp_then_ours, str(tmp_path), timeout=300)


# ---------------------------------------------------------- last step: HF safetensors


def _last_step_hf(rank: int, world: int, root: str) -> dict[str, Any] | None:
    run = _Run(rank, world, root, _ours(last_save_in_hf=True, export_dtype="bfloat16", interval=100))
    for _ in range(2):
        run.step()
    run.step(last_step=True)
    run.ckpt.close()
    full = {k.removeprefix("model."): v for k, v in run.full().items() if k.startswith("model.")}
    return _to_numpy(full) if rank == 0 else None


def test_torchtitan_last_step_exports_hf_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    full = run_ranks(2, _last_step_hf, str(tmp_path), timeout=300)[0]
    out = tmp_path / "ckpt" / f"{HF_EXPORT_PREFIX}3"
    assert sorted(os.listdir(out)) == ["model.safetensors", "model.safetensors.index.json"]
    hf = load_file(out / "model.safetensors")
    assert sorted(hf) == sorted(f"model.layers.{k}" for k in full)
    for k, v in full.items():
        assert torch.equal(hf[f"model.layers.{k}"], torch.from_numpy(v).to(torch.bfloat16)), k


# ------------------------------------------------------------- the benchmark still runs


def test_bench_integration_torchtitan_quick_runs() -> None:
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_integration_torchtitan.py", "--quick"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(out.stdout)
    for name in ("dcp", "dcp_async", "async_ckpt"):
        assert report[name]["first_save_step_s"] is not None, name
