"""Where the workers of all ranks meet: a key/value store of their own (``kvstore.py``).

Rank 0's trainer hosts it on a port the operating system picks (port 0), so
there is no free-port race, and publishes the address and the store's secret
once through the trainer's existing rendezvous store (a key/value write, not a
collective on the trainer's process group). The other ranks read them from there.

With ``SINGLE_RANK`` the group is this rank alone: a worker of world 1
needs no store, so nothing is hosted, published or read.
"""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from dataclasses import dataclass

import torch.distributed as dist

from ..single_rank import ProcessGroupArg, SingleRank
from .kvstore import StoreServer

__all__ = ["WorkerGroup", "join_worker_group", "take_instance"]

_instances = itertools.count()


@dataclass
class WorkerGroup:
    rank: int
    world_size: int
    host: str | None
    port: int | None
    session: str
    server: StoreServer | None = None
    """The store's server, hosted by rank 0 for the group's lifetime."""
    secret: str | None = None
    """What a worker presents to the store before it is served."""

    def close(self) -> None:
        """Stop rank 0's server: the workers of the other ranks see ``StoreLostError``. Idempotent."""
        server, self.server = self.server, None
        if server is not None:
            server.close()


def _advertised_host() -> str:
    explicit = os.environ.get("ASYNC_CKPT_STORE_HOST") or os.environ.get("MASTER_ADDR")
    if explicit:
        return explicit
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def take_instance(process_group: ProcessGroupArg) -> int | None:
    """The number of the next group of ``process_group``: taken in order on every rank, so they agree.

    A start on another thread (``worker/starter.py``) takes it on the caller's
    thread first, then joins there with it.
    """
    if isinstance(process_group, SingleRank):
        # Not counted: the other ranks never see this group, and the
        # instance numbers must agree across ranks for the groups they share.
        return None
    return next(_instances)


def join_worker_group(
    process_group: ProcessGroupArg, timeout: float, instance: int | None = None
) -> WorkerGroup:
    """Collective over the trainer ranks of ``process_group`` (all must call it, in order).

    ``instance``: from ``take_instance``, when it was taken earlier; by default, taken now.
    """
    if isinstance(process_group, SingleRank):
        return WorkerGroup(0, 1, None, None, uuid.uuid4().hex[:8])
    if instance is None:
        instance = next(_instances)
    if not (dist.is_available() and dist.is_initialized()):
        return WorkerGroup(0, 1, None, None, uuid.uuid4().hex[:8])
    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    if world == 1:
        return WorkerGroup(0, 1, None, None, uuid.uuid4().hex[:8])
    members = dist.get_process_group_ranks(process_group) if process_group is not None else list(range(world))
    key = f"async_ckpt/workers/{instance}/{members[0]}-{members[-1]}-{len(members)}"
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        server = StoreServer()
        session = uuid.uuid4().hex[:8]
        store.set(key, f"{_advertised_host()}|{server.port}|{session}|{server.secret}")
        return WorkerGroup(0, world, _advertised_host(), server.port, session, server, server.secret)
    host, port, session, secret = store.get(key).decode().split("|")
    return WorkerGroup(rank, world, host, int(port), session, secret=secret)
