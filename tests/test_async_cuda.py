"""The async save path with CUDA tensors: pinned staging, D2H copies, overlap mode.

Skipped without a GPU. Everything runs on one checkpointer (one worker start).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt as ac
from async_ckpt.testing import same_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(4 << 20, device="cuda", generator=g),  # 16 MiB
            "bf16": torch.randn(257, 129, device="cuda", generator=g).to(torch.bfloat16),
            "t": torch.randn(64, 48, device="cuda", generator=g).t(),  # non-contiguous
            "i": torch.arange(1000, device="cuda") * seed,
            "cpu": torch.randn(100, generator=torch.Generator().manual_seed(seed)),
        },
        "step": seed,
    }


def _clone(sd: dict[str, Any]) -> dict[str, Any]:
    return {"model": {k: v.detach().clone() for k, v in sd["model"].items()}, "step": sd["step"]}


def _check(path: Path, want: dict[str, Any], device: str) -> None:
    target: dict[str, Any] = {
        "model": {k: torch.zeros(v.shape, dtype=v.dtype, device=device) for k, v in want["model"].items()},
        "step": -1,
    }
    ac.load(target, path)
    for k, v in want["model"].items():
        assert target["model"][k].device.type == device, k
        assert same_bits(target["model"][k], v), k
    assert target["step"] == want["step"]


@pytest.fixture(scope="module")
def ck() -> Iterator[ac.AsyncCheckpointer]:
    with ac.AsyncCheckpointer(start=True, timeout=60) as c:
        yield c


def test_pinned_staging_and_d2h_round_trip(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(1)
    want = _clone(sd)
    p = ck.save(sd, tmp_path / "a")
    slots = ck._pool.slots()
    assert slots and slots[0].pinned, "staging buffers are not pinned under CUDA"
    # Staged: the caller may overwrite its GPU tensors at once.
    with torch.no_grad():
        for v in sd["model"].values():
            v.zero_()
    torch.cuda.synchronize()
    md = p.result(timeout=120)
    assert md.tensors["model.w"].shape == (4 << 20,)
    _check(tmp_path / "a", want, "cuda")
    _check(tmp_path / "a", want, "cpu")


def test_overlap_mode_with_cuda_tensors(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(2)
    want = _clone(sd)
    p = ck.save(sd, tmp_path / "ov", overlap=True)
    # Work queued on the default stream while staging runs on the side stream.
    x = torch.randn(1024, 1024, device="cuda")
    for _ in range(5):
        x = x @ x
        x = x / x.norm()
    p.staged.wait(timeout=60)
    with torch.no_grad():
        for v in sd["model"].values():
            v.add_(1)
    md = p.result(timeout=120)
    assert md.stats is not None
    _check(tmp_path / "ov", want, "cuda")


@pytest.mark.asyncio
async def test_async_overlap_mode_with_cuda_tensors(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(3)
    want = _clone(sd)
    p = await ck.async_save(sd, tmp_path / "aov", overlap=True)
    await p.staged
    with torch.no_grad():
        for v in sd["model"].values():
            v.mul_(-1)
    md = await p
    assert md.stats is not None
    # Same layout again: cached plan, same pinned slot.
    allocations = ck._pool.allocations
    md2 = await (await ck.async_save(sd, tmp_path / "aov2"))
    assert md2.stats is not None and md2.stats.plan_cached
    assert ck._pool.allocations == allocations and ck._pool.slots()[0].pinned
    _check(tmp_path / "aov", want, "cuda")


# ------------------------------------------------------------ ordering of the copies


def _queued_fill(x: torch.Tensor, value: float, stream: Any) -> None:
    """Queue about a second of GPU sleep, then ``x.fill_(value)``, on ``stream``: x changes only later."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(2_000_000_000)
        x.fill_(value)


@pytest.mark.parametrize("how", ["overlap", "async_save"])
def test_the_copy_waits_for_work_the_caller_queued_on_its_own_stream(
    ck: ac.AsyncCheckpointer, tmp_path: Path, how: str
) -> None:
    """Staging runs on the helper thread, whose current stream is the default one, not the caller's."""
    import asyncio

    x = torch.zeros(8 << 20, device="cuda")
    # Layout planned, buffer pinned and free again: pinning a new buffer (cudaHostRegister)
    # synchronizes the whole device, which would hide a copy that does not wait for the caller.
    ck.save({"x": x}, tmp_path / "warm").result(timeout=120)
    deadline = time.monotonic() + 60
    while any(slot.busy for slot in ck._pool.slots()) and time.monotonic() < deadline:
        time.sleep(0.01)
    allocations = ck._pool.allocations
    torch.cuda.synchronize()
    mine = torch.cuda.Stream()
    _queued_fill(x, 7.0, mine)
    with torch.cuda.stream(mine):  # the caller's current stream when it saves
        if how == "overlap":
            p = ck.save({"x": x}, tmp_path / how, overlap=True)
        else:
            p = asyncio.run(ck.async_save({"x": x}, tmp_path / how))
    p.result(timeout=120)
    assert ck._pool.allocations == allocations, "a new buffer was pinned: the test proves nothing"
    got = ac.load_state_dict(tmp_path / how)["x"]
    assert torch.equal(got, torch.full_like(got, 7.0)), "the checkpoint holds x from before the caller's fill"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu_than_the_current_one_are_copied_in_order(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    """A copy from cuda:1 runs on cuda:1's stream: an event on a cuda:0 stream does not cover it."""
    assert torch.cuda.current_device() == 0
    x = torch.zeros(64 << 20, device="cuda:1")  # 256 MiB: the copy takes milliseconds
    torch.cuda.synchronize(1)
    _queued_fill(x, 3.0, torch.cuda.current_stream(1))
    p = ck.save({"x": x, "y": torch.ones(10, device="cuda:0")}, tmp_path / "two")
    with torch.no_grad():
        x.zero_()  # staged: allowed at once
    p.result(timeout=120)
    got = ac.load_state_dict(tmp_path / "two")
    assert torch.equal(got["x"], torch.full_like(got["x"], 3.0))


# ------------------------------------------------------------ budget, guard, ranks


def test_budgeted_save_of_cuda_tensors_goes_round_by_round_bit_exact(tmp_path: Path) -> None:
    sd = _state(4)
    want = _clone(sd)
    with ac.AsyncCheckpointer(start=True, timeout=60, staging_budget=4 << 20) as ck:
        p = ck.save(sd, tmp_path / "b")
        with torch.no_grad():
            for v in sd["model"].values():
                v.zero_()
        md = p.result(timeout=120)
        assert ck._pool.slots()[0].pinned
    assert md.stats is not None and md.stats.rounds > 1
    _check(tmp_path / "b", want, "cuda")


def test_an_optimizer_step_right_after_an_overlap_save_waits_for_the_copy(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(64, 2048, device="cuda")).square().mean().backward()
        opt.step()
    opt.zero_grad()
    model(torch.randn(64, 2048, device="cuda")).square().mean().backward()
    want = copy.deepcopy({"model": model.state_dict(), "optim": opt.state_dict()})
    torch.cuda._sleep(1_000_000_000)  # the copy starts only after this: the step would race it
    p = ck.save({"model": model, "optim": opt}, tmp_path / "g", overlap=True)
    opt.step()  # guarded: waits until staged
    p.result(timeout=120)
    got = ac.load_state_dict(tmp_path / "g")
    for k, v in want["model"].items():
        assert same_bits(got["model"][k], v.cpu()), k
    for i, st in want["optim"]["state"].items():
        for k, v in st.items():
            assert same_bits(got["optim"]["state"][i][k], v.cpu()), (i, k)
    first = next(model.parameters())
    assert not torch.equal(first.cpu(), want["model"]["0.weight"].cpu()), "the step did not run"


def _replicated(seed: int) -> dict[str, Any]:
    """Eight 1 MiB tensors and a few small ones: the ranks can split the writing evenly."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    model = {f"w{i}": torch.randn(1 << 18, device="cuda", generator=g) for i in range(8)}
    model["bf16"] = torch.randn(257, 129, device="cuda", generator=g).to(torch.bfloat16)
    model["t"] = torch.randn(64, 48, device="cuda", generator=g).t()
    return {"model": model, "step": seed}


def _rank_replicated_on_the_gpu(rank: int, world: int, path: str) -> dict[str, Any]:
    torch.cuda.set_device(0)  # one GPU shared by every rank
    staging: list[int] = []
    with ac.AsyncCheckpointer(start=True, timeout=120) as ck:
        for version in (1, 2, 3):
            sd = _replicated(10 + version)  # same seed on every rank: fully replicated
            p = ck.save(sd, f"{path}/v{version}")
            with torch.no_grad():
                for v in sd["model"].values():
                    v.add_(1)
            md = p.result(timeout=120)
            assert md.stats is not None
            staging.append(ck.staging_bytes)
        assert ck._pool.slots()[-1].pinned
    return {"staging": staging}


@pytest.mark.slow
def test_two_ranks_on_one_gpu_stage_only_their_share_and_load_bit_exact(tmp_path: Path) -> None:
    from harness import run_ranks

    res = run_ranks(2, _rank_replicated_on_the_gpu, str(tmp_path), timeout=300, fresh=True)
    full = sum(t.numel() * t.element_size() for t in _replicated(0)["model"].values())
    for r in res:
        # The first save staged everything; later ones only this rank's share (plus alignment).
        assert r["staging"][-1] < 0.75 * full + (1 << 20), r["staging"]
    for version in (1, 2, 3):
        _check(tmp_path / f"v{version}", _clone(_replicated(10 + version)), "cuda")


_CPU_STATE_ON_A_GPU_MACHINE = """
import sys, torch, async_ckpt as ac
sd = {"w": torch.randn(1 << 20), "step": 3}
with ac.AsyncCheckpointer(start=True, timeout=120) as ck:
    ck.save(sd, sys.argv[1]).result(timeout=120)
    pinned = ck._pool.slots()[0].pinned
print(torch.cuda.is_initialized(), pinned)
"""


def test_a_cpu_state_dict_on_a_gpu_machine_is_staged_unpinned_without_a_cuda_context(tmp_path: Path) -> None:
    """Pinning a CPU-only layout gained nothing and created a CUDA context (on GPU 0) in every rank."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, "-c", _CPU_STATE_ON_A_GPU_MACHINE, str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    ).stdout.split()
    assert out == ["False", "False"], out
    got = {"w": torch.zeros(1 << 20), "step": -1}
    ac.load(got, tmp_path / "c")
    assert got["step"] == 3


def test_a_slot_first_used_for_cpu_tensors_is_pinned_when_cuda_tensors_reuse_it(tmp_path: Path) -> None:
    """Layout keys do not name devices: the slot a CPU save left unpinned is pinned for the GPU save."""
    g = torch.Generator().manual_seed(4)
    cpu = {"w": torch.randn(2 << 20, generator=g), "b": torch.randn(333, generator=g)}
    with ac.AsyncCheckpointer(start=True, timeout=120) as ck:
        ck.save(cpu, tmp_path / "cpu").result(timeout=120)
        assert not ck._pool.slots()[0].pinned
        gpu = {k: v.cuda() for k, v in cpu.items()}
        want = {k: v.clone() for k, v in cpu.items()}
        p = ck.save(gpu, tmp_path / "gpu")
        with torch.no_grad():
            for v in gpu.values():
                v.zero_()
        p.result(timeout=120)
        slots = ck._pool.slots()
        assert slots and all(s.pinned for s in slots)
    got = {k: torch.zeros_like(v) for k, v in want.items()}
    ac.load(got, tmp_path / "gpu")
    assert all(same_bits(got[k], want[k]) for k in want)
