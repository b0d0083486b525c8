"""transformers.Trainer with async_ckpt checkpoints: save, resume exactly, keep only committed ones.

A tiny GPT-2 built from a config (no download), trained for a few steps on CPU.
Dropout is on, so a resume that lost the RNG state would show in the losses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import async_ckpt as ac
from async_ckpt.integrations.transformers import AsyncCheckpointTrainer

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.slow,  # heavy frameworks' training loops: outside the fast set
]

MAX_STEPS = 6


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seq: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.2)
    return GPT2LMHeadModel(cfg)


def _args(out: os.PathLike[str] | str, **kw: object) -> TrainingArguments:
    base: dict[str, object] = dict(
        output_dir=str(out),
        max_steps=MAX_STEPS,
        save_steps=3,
        save_strategy="steps",
        per_device_train_batch_size=4,
        logging_steps=1,
        learning_rate=1e-3,
        warmup_steps=2,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        seed=7,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)  # type: ignore[arg-type]


def _losses(trainer: Trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _opt_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    sd = trainer.optimizer.state_dict()
    return {f"{i}.{name}": t for i, st in sd["state"].items() for name, t in st.items()}


def _train(
    out: os.PathLike[str] | str, resume: str | bool | None = None, **kw: object
) -> AsyncCheckpointTrainer:
    trainer = AsyncCheckpointTrainer(model=_model(), args=_args(out, **kw), train_dataset=_Tokens())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_resume_matches_uninterrupted_run(tmp_path) -> None:
    full = _train(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-3"
    # Our format, committed, with the Trainer's own trainer_state.json beside it.
    assert (ckpt / "metadata.json").is_file()
    assert (ckpt / "trainer_state.json").is_file()
    assert not (ckpt / "optimizer.pt").exists() and not (ckpt / "model.safetensors").exists()
    saved = ac.read_metadata(ckpt)
    assert any(k.startswith("optimizer.state.") for k in saved.tensors)
    assert "model.transformer.wte.weight" in saved.tensors

    resumed = _train(tmp_path / "resumed", resume=str(ckpt))

    assert resumed.state.global_step == full.state.global_step == MAX_STEPS
    # Steps 1-3 come back with the TrainerState; 4-6 are computed again and must match to the bit.
    assert _losses(resumed) == _losses(full)
    assert sorted(_losses(resumed)) == [1, 2, 3, 4, 5, 6]
    _assert_same_tensors(full.model.state_dict(), resumed.model.state_dict(), "model")
    _assert_same_tensors(_opt_tensors(full), _opt_tensors(resumed), "optimizer state")
    assert full.lr_scheduler.state_dict() == resumed.lr_scheduler.state_dict()
    # The uninterrupted run's stall per save: the first pays for the worker and buffers.
    stalls = [round(s.stall_s, 4) for s in full.async_save_stats]
    print(f"transformers Trainer save stalls (s), first then steady: {stalls}")
    assert len(stalls) == 2


def test_trainer_resume_true_restores_a_missing_trainer_state_file(tmp_path) -> None:
    out = tmp_path / "run"
    _train(out, max_steps=3)
    # A crash between the commit and the trainer_state.json write leaves the file out.
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    resumed = _train(out, resume=True)
    assert resumed.state.global_step == MAX_STEPS
    assert sorted(_losses(resumed)) == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()


@pytest.mark.slow
def test_trainer_rotation_keeps_the_newest_committed_checkpoints(tmp_path) -> None:
    out = tmp_path / "run"
    _train(out, save_steps=1, save_total_limit=2)
    kept = sorted(p.name for p in out.iterdir())
    assert kept == ["checkpoint-5", "checkpoint-6"]
    for name in kept:
        ac.read_metadata(out / name)  # committed


@pytest.mark.slow
def test_trainer_resumes_from_a_transformers_format_checkpoint(tmp_path) -> None:
    # A run checkpointed by the stock Trainer continues under async_ckpt.
    stock = Trainer(model=_model(), args=_args(tmp_path / "stock"), train_dataset=_Tokens())
    stock.train()
    resumed = _train(tmp_path / "ours", resume=str(tmp_path / "stock" / "checkpoint-3"))
    assert _losses(resumed) == _losses(stock)
    _assert_same_tensors(stock.model.state_dict(), resumed.model.state_dict(), "model")


def test_trainer_failed_save_raises_from_train_and_leaves_no_checkpoint(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ASYNC_CKPT_FAIL_AT", "commit:0")  # the worker inherits it: the first save fails
    trainer = AsyncCheckpointTrainer(model=_model(), args=_args(tmp_path / "run"), train_dataset=_Tokens())
    with pytest.raises(ac.CheckpointError, match="checkpoint-3"):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoint-3").exists()


def test_import_async_ckpt_pulls_in_no_hugging_face_package() -> None:
    code = (
        "import sys, async_ckpt; print(sorted(m for m in sys.modules if m in ('transformers', 'accelerate')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_bench_integration_transformers_quick_reports_both_trainers(tmp_path) -> None:
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_integration_transformers.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(out)], env=env, check=True, timeout=600
    )
    results = json.loads(out.read_text())
    for name in ("stock", "async_ckpt"):
        assert results[name]["step_with_save_s"] and results[name]["save_call_s"], name
    # Every save_every steps, and at the last step.
    saves = -(-results["steps"] // results["save_every"])
    assert len(results["async_ckpt"]["save_stats"]) == len(results["stock"]["save_call_s"]) == saves


@pytest.mark.parametrize("greater_is_better", [True, False])
def test_trainer_load_best_model_at_end_loads_the_best_async_checkpoint(tmp_path, greater_is_better) -> None:
    # On the loss, greater_is_better=True makes an earlier checkpoint the best; False, the newest one.
    trainer = AsyncCheckpointTrainer(
        model=_model(),
        args=_args(
            tmp_path / "run",
            eval_strategy="steps",
            eval_steps=3,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            greater_is_better=greater_is_better,
        ),
        train_dataset=_Tokens(),
        eval_dataset=_Tokens(n=8),
    )
    trainer.train()
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    best_step = (max if greater_is_better else min)(evals, key=lambda s: evals[s])
    assert trainer.state.best_model_checkpoint == str(tmp_path / "run" / f"checkpoint-{best_step}")
    saved = ac.load_state_dict(trainer.state.best_model_checkpoint, keys=["model"])["model"]
    for k, t in trainer.model.state_dict().items():
        assert torch.equal(t, saved[k]), k


def test_trainer_removes_an_interrupted_saves_staging_directory(tmp_path) -> None:
    out = tmp_path / "run"
    _train(out, max_steps=3)
    # What a crash mid-save leaves: the hidden staging directory of checkpoint-6, half written.
    leftover = out / ".checkpoint-6.tmp-0123abcd"
    leftover.mkdir()
    (leftover / "rank0-0.safetensors").write_bytes(b"\0" * 64)
    _train(out, resume=True)
    assert not leftover.exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6"]
