"""Crash consistency: SIGKILL the writer at deterministic points across a save.

Each scenario commits checkpoint A, then starts checkpoint B and kills a
process at one point of B's save (``async_ckpt._faults`` kill points, or a
test-driven ``os.kill`` at a gate inside the worker). Victims:

* the worker, in this test process (each ``AsyncCheckpointer`` spawns a
  worker that inherits ``ASYNC_CKPT_KILL_AT`` from ``os.environ``);
* the whole trainer, as a subprocess (``tests/_crash_trainer.py``): at the
  trainer points ``stage`` / ``staged``, or trainer and worker together;
* both ranks' workers of a 2-rank job saving DTensors.

Axes: kill point x victim x state-dict shape (small; 200 tensors; one tensor
over three 4 MiB checksum blocks; DTensors on 2 ranks) x plan (``fresh``: B
has a new layout, so the worker plans; ``cached``: B reuses A's layout and
the worker's cached plan) x target (B to a new path, or overwriting A).

After every kill: the previous committed checkpoint loads bit-exact; B is
never listed, read or loaded as committed (except after ``after_commit``,
and after a trainer death at ``staged``: then B is complete and loads
bit-exact); a cleanup call removes every leftover.

Trainer subprocesses and the 2-rank job are slow to start (they import torch,
and so do their workers), so they run one after another on a background
thread started with this module, overlapping the in-process scenarios (two
streams for two cores).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
import torch
from _crash_trainer import GateStorage, assert_tree_equal, blank_like, make_sd
from harness import run_ranks

import async_ckpt as ac
from async_ckpt.storage.local import LocalStorage
from async_ckpt.verify import verify_checkpoint

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

KILL_ENV = "ASYNC_CKPT_KILL_AT"
TESTS_DIR = Path(__file__).resolve().parent
TRAINER = TESTS_DIR / "_crash_trainer.py"
HAVE_CLI = importlib.util.find_spec("async_ckpt.cli") is not None


# ------------------------------------------------------------------ helpers


def _load_equal(path: Path, want: dict[str, Any]) -> None:
    target = blank_like(want)
    ac.load(target, path)
    assert_tree_equal(target, want, str(path))


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.exists() else []


def cleanup(root: Path, how: str = "storage") -> list[str]:
    """Remove the leftovers of interrupted saves under ``root``; return what was there.

    ``how``: ``storage`` (``LocalStorage().remove_uncommitted``), ``cli``
    (``async_ckpt.cli.main(["gc", root])`` in this process) or ``cli-process``
    (the installed ``async-ckpt gc ROOT`` command).
    """
    before = _leftovers(root)
    if how == "cli-process" and HAVE_CLI:
        exe = shutil.which("async-ckpt")
        cmd = (
            [exe]
            if exe
            else [sys.executable, "-c", "import sys; from async_ckpt.cli import main; sys.exit(main())"]
        )
        proc = subprocess.run([*cmd, "gc", str(root)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"async-ckpt gc failed: {proc.stdout}\n{proc.stderr}"
        assert (f"{len(before)} leftover" if before else "nothing to remove") in proc.stdout, proc.stdout
    elif how == "cli" and HAVE_CLI:
        from async_ckpt.cli import main

        assert main(["gc", str(root)]) == 0
    else:
        LocalStorage().remove_uncommitted(str(root))
    left = _leftovers(root)
    assert not left, f"cleanup ({how}) left {left} in {root}"
    return before


def _committed_names(root: Path) -> set[str]:
    """What a listing of the root calls committed (the manager's view, else metadata.json present)."""
    try:
        from async_ckpt.manager import scan_root
    except ImportError:
        return {p.name for p in root.iterdir() if (p / "metadata.json").is_file()}
    return {e.name for e in scan_root(LocalStorage(), str(root)) if e.committed}


def check_after_kill(
    root: Path,
    prev: tuple[Path, dict[str, Any]],
    b: tuple[Path, dict[str, Any]],
    *,
    b_committed: bool,
    how: str = "storage",
) -> list[str]:
    """The invariants every kill must keep; returns the leftovers the cleanup removed."""
    prev_path, prev_sd = prev
    b_path, b_sd = b
    listed = {Path(p).name for p in LocalStorage().list_children(str(root))}
    assert not any(n.startswith(".") for n in listed), listed
    committed = _committed_names(root)
    assert prev_path.name in committed or (b_committed and b_path == prev_path), committed
    assert (b_path.name in committed) == (b_committed or b_path == prev_path), (b_path, committed)
    removed: list[str] = []
    for phase in ("before cleanup", "after cleanup"):
        if b_committed:
            _load_equal(b_path, b_sd)
            report = verify_checkpoint(b_path)
            assert report.ok, (phase, report.problems)
            if b_path != prev_path:
                _load_equal(prev_path, prev_sd)
        else:
            # The previous checkpoint is intact, even where B was overwriting it.
            _load_equal(prev_path, prev_sd)
            assert verify_checkpoint(prev_path).ok, phase
            if b_path != prev_path:
                assert b_path.name not in listed
                with pytest.raises(ac.CheckpointError):
                    ac.read_metadata(b_path)
                with pytest.raises(ac.CheckpointError):
                    ac.load(blank_like(b_sd), b_path)
        if phase == "before cleanup":
            removed = cleanup(root, how)
    return removed


def _dead(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# Collected for the summary printed at the end (pytest -s shows it).
SURVIVED: list[str] = []


# --------------------------------------------- worker killed, in this process

# (shape, plan mode, kill point, where B goes)
WORKER_SCENARIOS = [
    *[
        ("small", "fresh", p, t)
        for p, t in [("plan", "new"), ("write", "same"), ("before_commit", "same"), ("after_commit", "new")]
    ],
    *[
        ("small", "cached", p, t)
        for p, t in [("write", "new"), ("before_commit", "same"), ("after_commit", "same")]
    ],
    ("many", "fresh", "plan", "same"),
    ("many", "fresh", "write", "new"),
    ("many", "cached", "write", "same"),
    ("many", "cached", "before_commit", "new"),
    ("many", "cached", "after_commit", "same"),
    ("big", "fresh", "plan", "new"),
    ("big", "fresh", "before_commit", "new"),
    ("big", "fresh", "after_commit", "same"),
    ("big", "cached", "write", "same"),
    ("big", "cached", "before_commit", "same"),
]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv(KILL_ENV, raising=False)
    # Workers must be able to unpickle the fault-injecting storages in _crash_trainer.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    )
    yield monkeypatch


def _save_prev(ck: ac.AsyncCheckpointer, shape: str, mode: str, a: Path) -> dict[str, Any]:
    """Commit A (twice in cached mode, so the worker caches the plan); return A's contents."""
    md = ck.save(make_sd(shape, 1), a).result(120)
    assert md.stats is not None and not md.stats.plan_cached
    if mode == "fresh":
        return make_sd(shape, 1)
    md = ck.save(make_sd(shape, 2), a).result(120)
    assert md.stats is not None and md.stats.plan_cached, "the layout's plan should be cached now"
    return make_sd(shape, 2)


@pytest.mark.parametrize(("shape", "mode", "point", "target"), WORKER_SCENARIOS)
def test_worker_killed_at_point(
    shape: str, mode: str, point: str, target: str, env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    b_save = 1 if mode == "fresh" else 2
    env.setenv(KILL_ENV, f"{point}:{b_save}")
    root = tmp_path / "ckpts"
    a = root / "A"
    b = a if target == "same" else root / "B"
    b_sd = make_sd(shape, 3, extra=mode == "fresh")
    with ac.AsyncCheckpointer() as ck:
        prev_sd = _save_prev(ck, shape, mode, a)
        pid = ck.worker_pid
        pending = ck.save(b_sd, b)
        assert pending.save_id == b_save
        err = pending.exception(120)
        assert isinstance(err, ac.CheckpointError) and "died" in str(err), err
        assert _dead(pid)
    removed = check_after_kill(
        root,
        (a, prev_sd),
        (b, b_sd),
        b_committed=point == "after_commit",
        how="cli" if target == "new" else "storage",
    )
    if point in ("write", "before_commit"):
        assert any(".tmp-" in n for n in removed), f"expected a staging dir to clean up, got {removed}"
    SURVIVED.append(f"worker@{point}/{shape}/{mode}/{target}: removed {removed}")


# --------------------------------------------- worker killed from outside


def test_idle_worker_killed_from_outside(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    with ac.AsyncCheckpointer() as ck:
        prev = make_sd("small", 1)
        ck.save(prev, root / "A").result(120)
        pid = ck.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while ck.worker_pid is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ck.worker_pid is None, "the checkpointer did not notice its worker died"
        b_sd = make_sd("small", 3)
        ck.save(b_sd, root / "B").result(120)  # a new worker takes over
        assert ck.worker_pid not in (None, pid)
        assert ck.worker_starts == 2
    check_after_kill(root, (root / "A", prev), (root / "B", b_sd), b_committed=True)
    SURVIVED.append("outside kill of an idle worker")


@pytest.mark.parametrize(("where", "shape"), [("open_shard", "big"), ("after_commit", "many")])
def test_worker_killed_from_outside_at_gate(
    where: str, shape: str, env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = tmp_path / "ckpts"
    gate = tmp_path / "gate"
    gate.mkdir()
    a, b = root / "A", root / "A"  # B overwrites A
    b_sd = make_sd(shape, 3)
    with ac.AsyncCheckpointer() as ck:
        prev = make_sd(shape, 1)
        ck.save(prev, a).result(120)
        pending = ck.save(b_sd, b, storage=GateStorage(str(gate), where))
        deadline = time.monotonic() + 120
        while not (gate / "reached").exists():
            assert time.monotonic() < deadline and not pending.done(), (
                pending.exception(0) if pending.done() else ""
            )
            time.sleep(0.01)
        pid = int((gate / "reached").read_text())
        assert pid == ck.worker_pid
        os.kill(pid, signal.SIGKILL)
        err = pending.exception(120)
        assert isinstance(err, ac.CheckpointError) and "died" in str(err), err
    removed = check_after_kill(root, (a, prev), (b, b_sd), b_committed=where == "after_commit")
    if where == "open_shard":
        assert any(".tmp-" in n for n in removed), removed
    SURVIVED.append(f"outside kill at {where}/{shape}: removed {removed}")


# ------------------------------------------------ the whole trainer killed
# These, and the 2-rank DTensor job below, run on a background thread from the
# start of the module (fixture ``trainer_runs``); their tests check the results.


@dataclass(frozen=True)
class TrainerScenario:
    point: str
    shape: str
    mode: str
    target: str
    job: bool = False
    """Kill trainer and worker together (the worker at ``point``, then the process group)."""

    @property
    def id(self) -> str:
        return f"{'job' if self.job else 'trainer'}@{self.point}-{self.shape}-{self.mode}-{self.target}"

    @property
    def b_committed(self) -> bool:
        # A trainer that dies after its request reached the worker does not stop the save.
        return self.point in ("staged", "after_commit")


TRAINER_SCENARIOS = [
    TrainerScenario("stage", "small", "fresh", "new"),
    TrainerScenario("stage", "many", "cached", "same"),
    TrainerScenario("stage", "big", "cached", "same"),
    TrainerScenario("staged", "small", "fresh", "new"),
    TrainerScenario("staged", "many", "cached", "same"),
    TrainerScenario("staged", "big", "fresh", "same"),
    TrainerScenario("write", "small", "cached", "same", job=True),
    TrainerScenario("before_commit", "big", "cached", "new", job=True),
]


class _Zygote:
    """``_crash_trainer.py --zygote``: forks one trainer per scenario, torch imported once."""

    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop(KILL_ENV, None)
        self.proc = subprocess.Popen(
            [sys.executable, str(TRAINER), "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            start_new_session=True,
        )

    def run(self, root: Path, sc: TrainerScenario) -> dict[str, Any]:
        b_save = 1 if sc.mode == "fresh" else 2
        env = {KILL_ENV: f"{sc.point}:{b_save}", "CRASH_JOB_KILL": "1" if sc.job else "0"}
        root.mkdir(parents=True)
        t0 = time.monotonic()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        spec = {"argv": [str(root), sc.shape, sc.mode, sc.target], "env": env, "timeout": 150}
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the trainer zygote died (exit {self.proc.wait()})")
        res = json.loads(line)
        out = res["output"]
        res["events"] = [json.loads(x) for x in out.splitlines() if x.startswith('{"event"')]
        res["stderr"] = out
        res["s"] = time.monotonic() - t0
        return res

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _background(base: Path, trainers: list[TrainerScenario], dtensor: bool) -> dict[str, Any]:
    """The selected trainer scenarios, then the 2-rank job, one after another on one thread."""
    futures: dict[str, concurrent.futures.Future[Any]] = {
        sc.id: concurrent.futures.Future() for sc in trainers
    }
    futures["dtensor"] = concurrent.futures.Future()

    def work() -> None:
        try:
            if trainers:
                zygote = _Zygote()
                try:
                    for sc in trainers:
                        try:
                            futures[sc.id].set_result(zygote.run(base / sc.id, sc))
                        except BaseException as exc:  # noqa: BLE001 - the scenario's test reports it
                            futures[sc.id].set_exception(exc)
                finally:
                    zygote.close()
        except BaseException as exc:  # noqa: BLE001
            for f in futures.values():
                if not f.done():
                    f.set_exception(exc)
        if not dtensor:
            futures["dtensor"].cancel()
            return
        try:
            res = run_ranks(2, _dt_body, str(base / "dtensor"), timeout=400, pg_timeout=120)
            futures["dtensor"].set_result(res)
        except BaseException as exc:  # noqa: BLE001
            futures["dtensor"].set_exception(exc)

    threading.Thread(target=work, name="crash-background", daemon=True).start()
    return futures


@pytest.fixture(scope="module", autouse=True)
def background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    # Only what this session selected (``-k`` runs stay quick).
    items = [
        i
        for i in request.session.items
        if isinstance(i, pytest.Function) and i.module is sys.modules[__name__]
    ]
    chosen = {
        cast(TrainerScenario, i.callspec.params["sc"]).id
        for i in items
        if i.originalname == "test_trainer_killed_at_point"
    }
    dtensor = any(i.originalname == "test_dtensor_two_ranks_workers_killed" for i in items)
    base = tmp_path_factory.mktemp("trainers")
    futures = _background(base, [sc for sc in TRAINER_SCENARIOS if sc.id in chosen], dtensor)
    yield {"base": base, "futures": futures}
    for f in futures.values():
        with contextlib.suppress(BaseException):
            f.result(timeout=600)
    print(f"\n[crash] kill scenarios survived: {len(SURVIVED)}")
    for line in SURVIVED:
        print("   ", line)


@pytest.mark.parametrize("sc", TRAINER_SCENARIOS, ids=lambda sc: sc.id)
def test_trainer_killed_at_point(sc: TrainerScenario, background: dict[str, Any]) -> None:
    root = background["base"] / sc.id
    res = background["futures"][sc.id].result(timeout=600)
    names = [e["event"] for e in res["events"]]
    detail = f"{sc.id}: rc={res['rc']} events={names}\n{res['stderr'][-3000:]}"
    assert res["rc"] == -signal.SIGKILL, detail
    assert "A committed" in names, detail
    worker = res["events"][names.index("A committed")]["worker"]
    # The kernel closes an exiting worker's stdout (the end of the output read
    # above) a few milliseconds before the process becomes a zombie.
    deadline = time.monotonic() + 60  # generous: the loop ends as soon as it is gone
    while not _dead(worker) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _dead(worker), f"worker {worker} outlived its trainer: {detail}"
    if sc.job:
        assert "B failed" in names and "closed" not in names, detail
    else:
        assert "B staged" not in names, detail  # died inside save(), at the point
    a = root / "A"
    b = a if sc.target == "same" else root / "B"
    prev = make_sd(sc.shape, 1 if sc.mode == "fresh" else 2)
    b_sd = make_sd(sc.shape, 3, extra=sc.mode == "fresh")
    removed = check_after_kill(
        root, (a, prev), (b, b_sd), b_committed=sc.b_committed, how="cli-process" if sc.job else "cli"
    )
    SURVIVED.append(f"{sc.id}: {res['s']:.1f}s, removed {removed}")


# --------------------------------------- DTensors on 2 ranks, both workers killed

DT_SCENARIOS = [
    ("plan", "fresh", "new"),
    ("write", "fresh", "same"),
    ("before_commit", "cached", "new"),
    ("after_commit", "fresh", "same"),
]


def _dt_sd(mesh: Any, seed: int, extra: bool = False, zeros: bool = False) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(seed)

    def t(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=g)
        return torch.zeros_like(x) if zeros else x

    sd: dict[str, Any] = {
        "dt": distribute_tensor(t(9, 6), mesh, [Shard(0)]),  # uneven: 5 and 4 rows
        "col": distribute_tensor(t(4, 5), mesh, [Shard(1)]),
        "rep": distribute_tensor(t(4), mesh, [Replicate()]),
        "plain": t(3),
        "step": -1 if zeros else seed,
    }
    if extra:
        sd["extra"] = distribute_tensor(t(6, 2), mesh, [Shard(0)])
    return sd


def _dt_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    from torch.distributed.tensor import DTensor

    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        if isinstance(w, DTensor):
            assert isinstance(g, DTensor) and torch.equal(g.to_local(), w.to_local()), k
        elif isinstance(w, torch.Tensor):
            assert torch.equal(g, w), k
        else:
            assert g == w, k


def _dt_body(rank: int, world: int, root: str) -> list[str]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.pop(KILL_ENV, None)  # whatever the parent had when it spawned us
    mesh = init_device_mesh("cpu", (world,))
    done = []
    for point, mode, target in DT_SCENARIOS:
        base = Path(root) / f"{point}-{mode}"
        a = base / "A"
        b = a if target == "same" else base / "B"
        b_save = 1 if mode == "fresh" else 2
        os.environ[KILL_ENV] = f"{point}:{b_save}"  # no rank: both ranks' workers die there
        try:
            with ac.AsyncCheckpointer(timeout=60) as ck:
                ck.save(_dt_sd(mesh, 1), a).result(120)
                seed = 1
                if mode == "cached":
                    md = ck.save(_dt_sd(mesh, 2), a).result(120)
                    assert md.stats is not None and md.stats.plan_cached
                    seed = 2
                pending = ck.save(_dt_sd(mesh, 3, extra=mode == "fresh"), b)
                err = pending.exception(120)
                # Rank 0's trainer closes the store its peers' workers use as soon as it
                # sees its own worker die; a peer still inside the commit step then
                # loses the store before reaching its own kill point.
                lost = rank != 0 and "rank 0's checkpointer was closed or its process died" in str(err)
                assert isinstance(err, ac.CheckpointError) and ("died" in str(err) or lost), err
        finally:
            del os.environ[KILL_ENV]
        dist.barrier()
        committed = point == "after_commit"
        if rank == 0:
            listed = {Path(p).name for p in LocalStorage().list_children(str(base))}
            if not committed and b != a:
                assert b.name not in listed
                try:
                    ac.read_metadata(b)
                except ac.CheckpointError:
                    pass
                else:
                    raise AssertionError(f"{point}: interrupted checkpoint reads as committed")
        for _ in range(2):  # before and after the cleanup
            if committed:
                got = _dt_sd(mesh, 3, extra=True, zeros=True)
                ac.load(got, b)
                _dt_equal(got, _dt_sd(mesh, 3, extra=True))
            if b != a or not committed:
                got = _dt_sd(mesh, seed, zeros=True)
                ac.load(got, a)
                _dt_equal(got, _dt_sd(mesh, seed))
            if rank == 0:
                before = _leftovers(base)
                LocalStorage().remove_uncommitted(str(base))
                assert not _leftovers(base), _leftovers(base)
                if _ == 0:
                    done.append(f"dtensor x2 ranks, both workers @{point}/{mode}/{target}: removed {before}")
            dist.barrier()
    return done


def test_dtensor_two_ranks_workers_killed(background: dict[str, Any]) -> None:
    results = background["futures"]["dtensor"].result(timeout=800)
    assert len(results[0]) == len(DT_SCENARIOS)
    SURVIVED.extend(results[0])


# ------------------------------------- the commit window, reconstructed by hand


@pytest.mark.parametrize("state", ["renamed_aside", "aside_no_metadata", "before_rmtree"])
def test_crash_inside_commit_is_repaired(state: str, tmp_path: Path) -> None:
    """The states a crash between commit's renames can leave (no kill point sits there).

    ``commit`` moves the old checkpoint to ``.A.old-T``, renames ``.A.tmp-T`` to
    ``A``, then deletes the old one. Cleanup must repair, never lose, both.
    """
    root = tmp_path / "ckpts"
    old_sd, new_sd = make_sd("small", 1), make_sd("small", 2)
    token = "0123456789abcdef"
    ac.save(old_sd, root / "A")
    ac.save(new_sd, root / "staged")
    stage = root / f".A.tmp-{token}"
    os.rename(root / "staged", stage)  # a finished staging dir: shards and metadata.json
    if state == "aside_no_metadata":
        (stage / "metadata.json").unlink()
    if state == "before_rmtree":
        # Both renames done: A is the new checkpoint, the old one still aside.
        os.rename(stage, root / "new")
        os.rename(root / "A", root / f".A.old-{token}")
        os.rename(root / "new", root / "A")
    else:
        os.rename(root / "A", root / f".A.old-{token}")
        # A reader in this window sees no checkpoint at all, never a partial one.
        with pytest.raises(ac.CheckpointError):
            ac.read_metadata(root / "A")
    cleanup(root)
    _load_equal(root / "A", old_sd if state == "aside_no_metadata" else new_sd)
    assert sorted(p.name for p in root.iterdir()) == ["A"]
