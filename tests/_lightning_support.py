"""A tiny Lightning model and its checks, shared by test_integration_lightning.py and its DDP run.

Run as a script (``python _lightning_support.py DIR``), it is the 2-process DDP
fit on gloo: Lightning launches rank 1 by running this script again.
"""

from __future__ import annotations

import datetime
import pathlib
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset


class TinyModel(L.LightningModule):
    def __init__(self, root: pathlib.Path = pathlib.Path("/data"), dtype: torch.dtype = torch.float32):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


def data() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=False)


def trainer_for(root: pathlib.Path, max_epochs: int, **kwargs: Any) -> L.Trainer:
    kwargs = {"accelerator": "cpu", "devices": 1, **kwargs}
    return L.Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        **kwargs,
    )


def snapshot(trainer: L.Trainer, model: L.LightningModule) -> dict[str, Any]:
    opt = trainer.optimizers[0].state_dict()
    return {
        "step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optim_state": {i: {k: v.clone() for k, v in s.items()} for i, s in opt["state"].items()},
        "param_groups": opt["param_groups"],
        "sched": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
    }


class Snapshot(Callback):
    """What training holds when fit starts (after a resume restored it) and when it ends."""

    def __init__(self) -> None:
        self.at: dict[str, dict[str, Any]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at["start"] = snapshot(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at["end"] = snapshot(trainer, pl_module)


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optim_state"].keys() == b["optim_state"].keys()
    for i in a["optim_state"]:
        for k, v in a["optim_state"][i].items():
            assert torch.equal(v, b["optim_state"][i][k]), (i, k)
    assert a["param_groups"] == b["param_groups"]
    assert a["sched"] == b["sched"]


def main(root: pathlib.Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from async_ckpt.integrations.lightning import AsyncCkptIO

    ckdir = root / "ckpts"

    def fit(max_epochs: int, ckpt_path: str | None) -> tuple[L.Trainer, Snapshot, AsyncCkptIO]:
        snap, io = Snapshot(), AsyncCkptIO()
        trainer = trainer_for(
            root,
            max_epochs,
            devices=2,
            strategy=DDPStrategy(process_group_backend="gloo", timeout=datetime.timedelta(seconds=120)),
            plugins=[io],
            callbacks=[ModelCheckpoint(ckdir, monitor="val_loss", save_top_k=2, save_last=True), snap],
        )
        trainer.fit(TinyModel(), data(), data(), ckpt_path=ckpt_path)
        return trainer, snap, io

    torch.manual_seed(1)
    trainer, first, io = fit(3, None)
    rank = trainer.global_rank
    if rank == 0:
        names = sorted(p.name for p in ckdir.iterdir())
        assert "last.ckpt" in names and len(names) == 3, names
        assert all((ckdir / n / "metadata.json").is_file() for n in names), names
    else:
        assert io.checkpointer.worker_pid is None, "rank 1 started a worker: only rank 0 saves"
    torch.manual_seed(2)
    _, resumed, _ = fit(5, str(ckdir / "last.ckpt"))  # every rank loads last.ckpt alone
    assert_same(first.at["end"], resumed.at["start"])
    (root / f"ok-rank{rank}").touch()
    trainer.strategy.barrier("checked")
    if rank == 0:
        assert (root / "ok-rank1").exists()
        print("DDP OK", flush=True)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
