"""``AsyncCkptIO`` under a real Lightning ``Trainer`` (CPU): save, resume exactly, rank-0 saves under DDP."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import torch

L = pytest.importorskip("lightning")

from _lightning_support import Snapshot, TinyModel, assert_same, data, trainer_for  # noqa: E402
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

import async_ckpt as ac  # noqa: E402
from async_ckpt.integrations.lightning import AsyncCkptIO  # noqa: E402

pytestmark = [
    # Lightning's advice (few dataloader workers, small batch counts) is not ours to fix.
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:lightning.*"),
    pytest.mark.slow,  # heavy frameworks' training loops: outside the fast set
]

HERE = pathlib.Path(__file__).parent


class TimedIO(AsyncCkptIO):
    """Records how long each save_checkpoint blocked training: the first save next to steady ones."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stalls: list[tuple[str, float]] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        t0 = time.perf_counter()
        super().save_checkpoint(checkpoint, path, storage_options)
        self.stalls.append((os.path.basename(path), time.perf_counter() - t0))


def test_fit_with_topk_and_last_then_resume_from_last_restores_exactly(tmp_path: pathlib.Path) -> None:
    ckdir = tmp_path / "ckpts"

    def callbacks(snap: Snapshot) -> list[Callback]:
        ckpt = ModelCheckpoint(dirpath=ckdir, monitor="val_loss", save_top_k=2, save_last=True)
        return [ckpt, snap]

    torch.manual_seed(1)
    first, io = Snapshot(), TimedIO()
    trainer = trainer_for(tmp_path, 3, plugins=[io], callbacks=callbacks(first))
    trainer.fit(TinyModel(dtype=torch.bfloat16), data(), data())
    print("\nsave_checkpoint stalls (first, then steady):", [(n, f"{s * 1e3:.1f} ms") for n, s in io.stalls])

    names = sorted(p.name for p in ckdir.iterdir())
    assert "last.ckpt" in names and len(names) == 3, names  # top 2 of 3 epochs, plus last
    for name in names:
        assert (ckdir / name / "metadata.json").is_file(), name
    assert len(io.stalls) == 6  # top-k and last at each of 3 epochs

    # Lightning's own dict, read back without pickle: value types as saved.
    loaded = AsyncCkptIO(start_worker=False).load_checkpoint(ckdir / "last.ckpt")
    assert loaded["hyper_parameters"] == {"root": pathlib.Path("/data"), "dtype": torch.bfloat16}
    assert loaded["global_step"] == first.at["end"]["step"] == 12
    assert sorted(loaded["optimizer_states"][0]["state"]) == [0, 1, 2, 3]
    cb_state = next(v for k, v in loaded["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert cb_state["last_model_path"] == str(ckdir / "last.ckpt")
    assert len(cb_state["best_k_models"]) == 2

    # Resume with a different init: everything comes from last.ckpt.
    torch.manual_seed(2)
    resumed = Snapshot()
    trainer2 = trainer_for(tmp_path, 5, plugins=[AsyncCkptIO()], callbacks=callbacks(resumed))
    trainer2.fit(TinyModel(), data(), data(), ckpt_path=str(ckdir / "last.ckpt"))
    assert_same(first.at["end"], resumed.at["start"])

    # And training goes on as if never stopped: bit-exact against one uninterrupted run.
    torch.manual_seed(1)
    straight = Snapshot()
    trainer_for(tmp_path / "straight", 5, enable_checkpointing=False, callbacks=[straight]).fit(
        TinyModel(), data(), data()
    )
    assert_same(straight.at["end"], resumed.at["end"])


def test_worker_starts_in_background_before_the_first_save() -> None:
    io = AsyncCkptIO()
    try:
        deadline = time.monotonic() + 120
        while io.checkpointer.worker_pid is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert io.checkpointer.worker_pid is not None, "no worker started without a save"
    finally:
        io.teardown()


def test_two_saves_at_one_step_return_while_the_first_is_still_writing(tmp_path: pathlib.Path) -> None:
    io = AsyncCkptIO()
    state = {"state_dict": {"w": torch.randn(256, 256)}, "global_step": 10}
    io.save_checkpoint(state, tmp_path / "warm.ckpt")  # the worker is up and the buffers exist
    io.teardown()  # waits for the warm save; the worker stops
    io = AsyncCkptIO()
    pid = None
    deadline = time.monotonic() + 120
    while pid is None and time.monotonic() < deadline:
        pid = io.checkpointer.worker_pid
        time.sleep(0.05)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the worker writes nothing until SIGCONT
    try:
        done = threading.Event()

        def two_saves() -> None:
            io.save_checkpoint(state, tmp_path / "epoch=0-step=10.ckpt")
            io.save_checkpoint({**state, "last": True}, tmp_path / "last.ckpt")
            done.set()

        t = threading.Thread(target=two_saves, daemon=True)
        t.start()
        returned = done.wait(60)
        assert not (tmp_path / "epoch=0-step=10.ckpt").exists()  # nothing written yet
    finally:
        os.kill(pid, signal.SIGCONT)
    assert returned, "the second save waited for the first one's write"
    t.join(60)
    io.teardown()
    for name in ("epoch=0-step=10.ckpt", "last.ckpt"):
        back = io.load_checkpoint(tmp_path / name)
        assert torch.equal(back["state_dict"]["w"], state["state_dict"]["w"]) and back["global_step"] == 10
    assert back["last"] is True


def test_failed_save_raises_at_the_next_save_and_at_teardown(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNC_CKPT_FAIL_AT", "commit:0")  # the worker inherits it
    io = AsyncCkptIO()
    io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "a.ckpt")
    with pytest.raises(ac.CheckpointError, match=r"a\.ckpt"):
        io.teardown()
    monkeypatch.delenv("ASYNC_CKPT_FAIL_AT")  # the next save starts a new worker, whose save ids start at 0
    io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "b.ckpt")
    io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "c.ckpt")
    io.teardown()
    assert torch.equal(io.load_checkpoint(tmp_path / "c.ckpt")["w"], torch.ones(3))


def test_failed_save_raises_at_the_next_save_checkpoint(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNC_CKPT_FAIL_AT", "commit:0")
    io = AsyncCkptIO()
    try:
        io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "a.ckpt")
        io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "b.ckpt")
        io.load_checkpoint(tmp_path / "b.ckpt")  # saves finish in order: a.ckpt has failed by now
        with pytest.raises(ac.CheckpointError, match=r"a\.ckpt"):
            io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "c.ckpt")
    finally:
        io.teardown()
    assert not (tmp_path / "a.ckpt").exists() and not (tmp_path / "c.ckpt").exists()


def test_remove_checkpoint_through_a_link_keeps_its_target(tmp_path: pathlib.Path) -> None:
    io = AsyncCkptIO(start_worker=False)
    target, link = tmp_path / "epoch=0-step=4.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(4.0)}, target)
    io.teardown()
    link.symlink_to(target.name)  # what ModelCheckpoint(save_last="link") makes
    assert torch.equal(io.load_checkpoint(link)["w"], torch.arange(4.0))
    io.remove_checkpoint(link)
    assert not link.exists() and not link.is_symlink()
    assert torch.equal(io.load_checkpoint(target)["w"], torch.arange(4.0))
    io.remove_checkpoint(target)
    assert not target.exists()


def test_save_last_link_points_at_the_newest_checkpoint_directory(tmp_path: pathlib.Path) -> None:
    ckdir = tmp_path / "ckpts"
    snap = Snapshot()
    callbacks = [ModelCheckpoint(ckdir, monitor="val_loss", save_top_k=1, save_last="link"), snap]
    trainer_for(tmp_path, 2, plugins=[AsyncCkptIO()], callbacks=callbacks).fit(TinyModel(), data(), data())
    last = ckdir / "last.ckpt"
    assert last.is_symlink() and (last / "metadata.json").is_file()
    loaded = AsyncCkptIO(start_worker=False).load_checkpoint(last)
    assert loaded["global_step"] == snap.at["end"]["step"]
    for k, v in snap.at["end"]["model"].items():
        assert torch.equal(loaded["state_dict"][k], v), k


def test_plugin_pickles_without_its_worker(tmp_path: pathlib.Path) -> None:
    io = AsyncCkptIO(max_in_flight=1)
    try:
        copy = pickle.loads(pickle.dumps(io))  # what ddp_spawn does to the plugin
        assert copy.checkpointer is not io.checkpointer
        copy.save_checkpoint({"w": torch.ones(2)}, tmp_path / "x.ckpt")
        copy.teardown()
        assert torch.equal(io.load_checkpoint(tmp_path / "x.ckpt")["w"], torch.ones(2))
    finally:
        io.teardown()


def test_remove_checkpoint_waits_for_its_save_in_flight(tmp_path: pathlib.Path) -> None:
    io = AsyncCkptIO()
    path = tmp_path / "epoch=0.ckpt"
    io.save_checkpoint({"w": torch.randn(512, 512)}, path)
    io.remove_checkpoint(path)  # a commit after this would bring it back
    io.teardown()
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_load_checkpoint_reads_a_torch_save_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "old.ckpt"
    TorchCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    back = AsyncCkptIO(start_worker=False).load_checkpoint(path)
    assert back["global_step"] == 3 and torch.equal(back["state_dict"]["w"], torch.ones(2))


def test_storage_options_are_refused(tmp_path: pathlib.Path) -> None:
    io = AsyncCkptIO(start_worker=False)
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"w": torch.ones(1)}, tmp_path / "x.ckpt", storage_options={"a": 1})


@pytest.mark.slow
def test_ddp_fit_on_gloo_saves_on_rank_zero_and_resumes(tmp_path: pathlib.Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(HERE / "_lightning_support.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "DDP OK" in proc.stdout, proc.stdout[-4000:]


def test_import_async_ckpt_imports_no_lightning() -> None:
    code = (
        "import sys, async_ckpt\n"
        "assert not {m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning'}"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_bench_integration_lightning_quick_runs(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable,
            str(HERE.parent / "benchmarks" / "bench_integration_lightning.py"),
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    report = {r["mode"]: r for r in json.loads(out.read_text())}
    assert report["default"]["save_step_s"] is not None and report["default"]["saves"] >= 1
    assert report["async_ckpt"]["first_stall_s"] is not None and report["async_ckpt"]["saves"] >= 1
