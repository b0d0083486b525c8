"""accelerate with async_ckpt: save what Accelerator.save_state saves, in the background; resume exactly.

The loop below is the one docs/integrations.md shows. Dropout is on, so a
resume that lost the RNG state would show in the losses.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

pytest.importorskip("accelerate")

import torch
from accelerate import Accelerator

import async_ckpt as ac
from async_ckpt.integrations.accelerate import accelerator_state, load_accelerator_state

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.slow,  # heavy frameworks' training loops: outside the fast set
]

STEPS = 8


class _Counter:
    """A registered object: anything with state_dict/load_state_dict."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict[str, int]:
        return {"seen": self.seen}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.seen = sd["seen"]


def _setup() -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer, object, object, _Counter]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.3), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(4 * STEPS, 8, generator=g), torch.randn(4 * STEPS, 1, generator=g)
    )
    accelerator = Accelerator(cpu=True)
    # Its own generator: a DataLoader without one draws from torch's global generator each time an
    # iterator starts, so the resumed run's dropout would be one draw off the uninterrupted run's.
    loader = torch.utils.data.DataLoader(data, batch_size=4, generator=torch.Generator().manual_seed(2))
    model, opt, dl, sched = accelerator.prepare(model, opt, loader, sched)
    counter = _Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, opt, dl, sched, counter


def _run(
    tmp_path, resume_from: str | None = None
) -> tuple[dict[int, float], torch.nn.Module, object, _Counter]:
    accelerator, model, opt, dl, sched, counter = _setup()
    losses: dict[int, float] = {}
    first = 0
    with ac.AsyncCheckpointer(start=True) as ckpt:  # worker started now, not at the first save
        if resume_from is not None:
            load_accelerator_state(accelerator, resume_from)
            first = ac.load_state_dict(resume_from, keys=["train_step"])["train_step"]
            dl = accelerator.skip_first_batches(dl, first)
        for step, (x, y) in enumerate(dl, start=first + 1):
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            counter.seen += len(x)
            losses[step] = loss.item()
            if step % 4 == 0:
                # Returns once staged: training goes on while the worker writes.
                ckpt.save({**accelerator_state(accelerator), "train_step": step}, tmp_path / f"step-{step}")
    return losses, model, opt, counter


def test_accelerate_resume_matches_uninterrupted_run(tmp_path) -> None:
    full_losses, full_model, full_opt, full_counter = _run(tmp_path / "full")
    resumed_losses, model, opt, counter = _run(
        tmp_path / "resumed", resume_from=str(tmp_path / "full" / "step-4")
    )

    assert resumed_losses == {s: v for s, v in full_losses.items() if s > 4}
    assert sorted(resumed_losses) == [5, 6, 7, 8]
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for pid, st in full_opt.state_dict()["state"].items():
        for k, t in st.items():
            assert torch.equal(t, opt.state_dict()["state"][pid][k]), (pid, k)
    assert counter.seen == full_counter.seen == 4 * STEPS
    saved = ac.read_metadata(tmp_path / "full" / "step-4")
    assert {"step", "train_step"} <= set(saved.values)
    assert "model_0.0.weight" in saved.tensors and "optimizer_0.state.0.exp_avg" in saved.tensors
