"""A tiny trainer that the reliability tests run as a subprocess, and shared helpers.

As a script::

    python tests/_crash_trainer.py ROOT SHAPE MODE TARGET

it is one trainer: it makes an ``AsyncCheckpointer``, commits checkpoint A (save 0; in ``cached``
mode A is saved twice, so the worker holds a cached plan for the layout), then
saves checkpoint B (save 1 in ``fresh`` mode, with one extra key so its layout
is new and the worker must plan; save 2 in ``cached`` mode, same layout) while
``ASYNC_CKPT_KILL_AT`` (set by the test) kills the trainer or the worker at a
chosen point. ``TARGET`` is ``new`` (B goes to ROOT/B) or ``same`` (B
overwrites ROOT/A). With ``CRASH_JOB_KILL=1`` the trainer SIGKILLs its whole
process group (itself and its worker) once B has failed or finished. Progress
goes to stdout as one JSON object per line.

``python tests/_crash_trainer.py --zygote`` imports torch and async_ckpt once,
then reads one scenario per stdin line (``{"argv": [...], "env": {...}}``) and
forks a trainer process for each (in a session of its own), so a batch of
crash scenarios pays the import once instead of once per trainer. For each it
waits until the trainer *and its worker* are gone (the end of their shared
output pipe) and answers one line: ``{"rc": ..., "output": ...}``, ``rc``
negative for a signal as in ``subprocess``.

As a module (the tests put ``tests/`` on ``PYTHONPATH`` so that worker
processes can unpickle these too): the deterministic state dicts and a few
``Storage`` wrappers that inject faults inside the worker.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from async_ckpt.storage.local import LocalStorage, staging_dir

SHAPES = ("small", "many", "big")
BLOCK = 4 << 20
# float32 elements: ~8.8 MB, so the tensor spans three 4 MiB checksum blocks.
BIG_NUMEL = 2_200_000


# ------------------------------------------------------------ state dicts


def make_sd(shape: str, seed: int, *, extra: bool = False) -> dict[str, Any]:
    """A deterministic state dict; ``extra`` adds a key (a new layout: the worker must re-plan)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any]
    if shape == "small":
        sd = {
            "model": {
                "w": torch.randn(8, 4, generator=g),
                "b": torch.randn(4, generator=g).to(torch.bfloat16),
                "i": torch.randint(-(2**40), 2**40, (5,), generator=g),
            },
            "opt": {"lr": 0.1 * seed, "step": seed},
            "tag": f"seed-{seed}",
        }
    elif shape == "many":
        sd = {
            "layers": [
                {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(100)
            ],
            "step": seed,
        }
    elif shape == "big":
        sd = {
            "big": torch.randn(BIG_NUMEL, generator=g),
            "small": torch.randn(3, generator=g),
            "step": seed,
        }
    else:
        raise ValueError(shape)
    if extra:
        sd["extra"] = torch.randn(7, generator=g)
    return sd


def blank_like(x: Any) -> Any:
    """A load target with the same structure and different contents."""
    if isinstance(x, torch.Tensor):
        return torch.full_like(x, 7)
    if isinstance(x, dict):
        return {k: blank_like(v) for k, v in x.items()}
    if isinstance(x, list):
        return [blank_like(v) for v in x]
    if isinstance(x, bool):
        return not x
    if isinstance(x, int):
        return -1
    if isinstance(x, float):
        return -1.0
    if isinstance(x, str):
        return ""
    return None


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def assert_tree_equal(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: not a tensor"
        assert same_bits(got, want), f"{where}: loaded bytes differ from the saved ones"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {set(got)} != {set(want)}"
        for k in want:
            assert_tree_equal(got[k], want[k], f"{where}.{k}" if where else str(k))
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_tree_equal(g, w, f"{where}.{i}")
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


# --------------------------------------------------- fault-injecting storage


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


class GateStorage(LocalStorage):
    """Stops inside the worker at ``where`` (``open_shard`` or ``after_commit``).

    It creates ``gate/reached`` there and waits for ``gate/go``, so a test can
    SIGKILL the worker at exactly that moment without guessing with sleeps.
    """

    def __init__(self, gate: str, where: str) -> None:
        super().__init__()
        self.gate = gate
        self.where = where

    def _stop(self) -> None:
        # Written aside and renamed: a test polls for ``reached`` and reads the
        # pid at once, and a plain write_text let it see the empty file between
        # create and write (CI: "invalid literal for int() with base 10: ''").
        tmp = Path(self.gate, f".reached.{os.getpid()}")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, Path(self.gate, "reached"))
        _wait_for(Path(self.gate, "go"), 120.0)

    async def open_shard(self, location: str, token: str, name: str) -> Any:
        if self.where == "open_shard":
            self._stop()
        return await super().open_shard(location, token, name)

    def commit(self, location: str, token: str, metadata: bytes) -> None:
        super().commit(location, token, metadata)
        if self.where == "after_commit":
            self._stop()


class DeletingStorage(LocalStorage):
    """Deletes the save's staging directory just before ``when`` (open_shard or commit)."""

    def __init__(self, when: str) -> None:
        super().__init__()
        self.when = when

    async def open_shard(self, location: str, token: str, name: str) -> Any:
        if self.when == "open_shard":
            shutil.rmtree(staging_dir(location, token), ignore_errors=True)
        return await super().open_shard(location, token, name)

    def commit(self, location: str, token: str, metadata: bytes) -> None:
        if self.when == "commit":
            shutil.rmtree(staging_dir(location, token), ignore_errors=True)
        super().commit(location, token, metadata)


class _FullSink:
    def __init__(self, inner: Any, budget: int, path: str) -> None:
        self._inner = inner
        self._budget = budget
        self._path = path

    async def write(self, data: memoryview) -> None:
        if len(data) > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
        self._budget -= len(data)
        await self._inner.write(data)

    async def finish(self) -> None:
        await self._inner.finish()

    async def abort(self) -> None:
        await self._inner.abort()


class EnospcStorage(LocalStorage):
    """A file system that is full after ``budget`` bytes per shard (where no small mount is possible)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    async def open_shard(self, location: str, token: str, name: str) -> Any:
        sink = await super().open_shard(location, token, name)
        return _FullSink(sink, self.budget, str(staging_dir(location, token) / name))


# ------------------------------------------------------------------ script


def _emit(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


def main(argv: list[str]) -> int:
    root, shape, mode, target = argv[1:5]
    import async_ckpt as ac

    ck = ac.AsyncCheckpointer()
    a_path = os.path.join(root, "A")
    ck.save(make_sd(shape, 1), a_path).result(120)
    if mode == "cached":
        ck.save(make_sd(shape, 2), a_path).result(120)
    _emit(event="A committed", worker=ck.worker_pid)
    b_path = a_path if target == "same" else os.path.join(root, "B")
    pending = ck.save(make_sd(shape, 3, extra=mode == "fresh"), b_path)
    _emit(event="B staged")
    try:
        pending.result(120)
        _emit(event="B committed")
    except ac.CheckpointError as exc:
        _emit(event="B failed", error=str(exc))
    if os.environ.get("CRASH_JOB_KILL") == "1":
        os.killpg(0, signal.SIGKILL)
    ck.close()
    _emit(event="closed")
    return 0


def _run_forked(argv: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the trainer
        code = 70
        try:
            os.close(r)
            os.setsid()  # its own process group: a job kill or a timeout takes it and its worker
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.close(w)
            os.environ.update(env)
            code = main(["trainer", *argv])
        except BaseException:  # noqa: BLE001 - reported through the exit status
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(w)
    out = bytearray()
    deadline = time.monotonic() + timeout
    timed_out = False
    import select

    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            continue
        ready, _, _ = select.select([r], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:  # trainer and worker both gone
                break
            out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return {"rc": "timeout" if timed_out else rc, "output": out.decode(errors="replace")}


def zygote() -> int:
    import async_ckpt  # noqa: F401 - paid once here, inherited by every forked trainer

    for line in sys.stdin:
        spec = json.loads(line)
        print(json.dumps(_run_forked(spec["argv"], spec["env"], spec.get("timeout", 150))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(zygote() if sys.argv[1:] == ["--zygote"] else main(sys.argv))
