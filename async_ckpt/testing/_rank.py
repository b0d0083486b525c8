"""The rank side of a pool: join the group once, then run calls until told to stop."""

from __future__ import annotations

import asyncio
import faulthandler
import importlib
import importlib.util
import inspect
import os
import pickle
import signal
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._call import Call

__all__ = ["RankContext", "main"]


@dataclass(frozen=True, slots=True)
class RankContext:
    """This rank's view inside a ``@pytest.mark.ranks(n)`` test."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mesh(self, shape: tuple[int, ...] | None = None, names: tuple[str, ...] | None = None) -> Any:
        """A CPU ``DeviceMesh`` over the test's ranks (1-D of ``world_size`` unless ``shape`` says)."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = shape or (self.world_size,)
        return init_device_mesh("cpu", shape, mesh_dim_names=names)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


class _Group:
    """The default process group of this rank, rebuilt when the parent moves to a new generation."""

    def __init__(self, rank: int, world: int, port: int) -> None:
        import torch.distributed as dist

        self.rank, self.world = rank, world
        self.store = dist.TCPStore(
            "127.0.0.1", port, world + 1, is_master=False, timeout=timedelta(seconds=60)
        )
        self.generation = -1

    def ensure(self, generation: int, pg_timeout: float) -> None:
        import torch.distributed as dist

        if generation == self.generation and dist.is_initialized():
            return
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore(f"gen{generation}", self.store),
            rank=self.rank,
            world_size=self.world,
            timeout=timedelta(seconds=pg_timeout),
        )
        self.generation = generation

    def intact(self) -> bool:
        import torch.distributed as dist

        return bool(dist.is_initialized() and dist.get_world_size() == self.world)


def main(rank: int, world: int, port: int, conn: Connection, dump_path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Open for the process's life: faulthandler writes the stacks here when the parent asks.
    dump = open(dump_path, "w")
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    group = _Group(rank, world, port)
    inherited = dict(os.environ)  # from the parent at spawn time
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            break
        generation, call = msg
        env, cwd = dict(os.environ), os.getcwd()
        try:
            if call.env is not None:
                _take_env(call.env, inherited)
            group.ensure(generation, call.pg_timeout)
            result = _run(call, rank, world)
            reply: tuple[str, Any, bool] = ("ok", result, group.intact())
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent as text
            reply = ("error", traceback.format_exc(), False)
        try:
            _reset(env, cwd)
        except BaseException:  # noqa: BLE001
            reply = (
                "error",
                f"resetting rank {rank} after the call failed:\n{traceback.format_exc()}",
                False,
            )
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            conn.send(("error", f"rank {rank} returned a value that cannot be sent back: {e!r}", False))
    _reset({}, None)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _run(call: Call, rank: int, world: int) -> Any:
    for p in reversed(call.sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    fn = call.fn if call.fn is not None else _find(call)
    kwargs = dict(call.kwargs)
    ctx = RankContext(rank, world)
    for name, kind in call.rank_args.items():
        kwargs[name] = ctx if kind == "rank" else ctx.mesh()
    args = (rank, world, *call.args) if call.pass_rank else call.args
    result = fn(*args, **kwargs)
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    return result


def _find(call: Call) -> Any:
    """The test function, by module and qualname (a method gets a fresh instance of its class)."""
    module = sys.modules.get(call.module)
    if module is None:
        try:
            module = importlib.import_module(call.module)
        except ImportError:
            spec = importlib.util.spec_from_file_location(call.module, call.module_file)
            if spec is None or spec.loader is None:
                raise
            module = importlib.util.module_from_spec(spec)
            sys.modules[call.module] = module
            spec.loader.exec_module(module)
    owner: Any = module
    parts = call.qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    if isinstance(owner, type):
        owner = owner()
    return getattr(owner, parts[-1])


def _take_env(parent: dict[str, str], inherited: dict[str, str]) -> None:
    """The parent's environment now; what the rank set for itself (not inherited) stays."""
    for key in [k for k in os.environ if k in inherited and k not in parent]:
        del os.environ[key]
    os.environ.update(parent)


def _reset(env: dict[str, str], cwd: str | None) -> None:
    """Leave the process as the next call expects it: no default checkpointers, no fault hooks, same env."""
    api = sys.modules.get("async_ckpt.api")
    if api is not None:
        api._close_defaults()
    faults = sys.modules.get("async_ckpt._faults")
    if faults is not None:
        faults._HOOKS.clear()
    if cwd is not None:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
