"""The workers' own collectives, over a store that only the workers use (``worker/kvstore.py``).

Each wait has a deadline, and a missed deadline names the ranks that did not
arrive, so a dead or stuck rank produces an error that says which one instead
of a hang. Keys are scoped by save id and a per-save sequence number, so a
save that failed half way leaves nothing that a later save could misread, and
a restarted worker can rejoin at the next save.

Payloads are pickled: this is transport between our own processes, never a
file; nothing read from a checkpoint goes through here.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

from ..errors import CheckpointError
from .kvclient import StoreClient

__all__ = ["RankTimeoutError", "StoreComm", "StoreLostError"]


class RankTimeoutError(CheckpointError):
    """Some ranks did not reach a collective step in time."""

    def __init__(self, step: str, ranks: Sequence[int], timeout: float) -> None:
        self.ranks = list(ranks)
        names = ", ".join(str(r) for r in ranks)
        super().__init__(
            f"{step}: rank(s) {names} did not respond within {timeout:g}s "
            "(its process died, or it is stuck or not saving)"
        )


class StoreLostError(CheckpointError):
    """The workers' store stopped answering: the process hosting it is gone."""

    def __init__(self, step: str, address: str, exc: BaseException) -> None:
        super().__init__(
            f"{step}: lost the connection to the workers' store at {address}, which rank 0's "
            "trainer hosts: rank 0's checkpointer was closed or its process died "
            f"({type(exc).__name__}: {exc})"
        )


class StoreComm:
    def __init__(
        self,
        store: StoreClient,
        rank: int,
        world_size: int,
        *,
        timeout: float,
        prefix: str = "",
        address: str = "?",
    ) -> None:
        self.store = _Guarded(store, self, address)
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.prefix = prefix
        self.step = "save"
        self._scope = "init"
        self._seq = 0
        self._to_delete: list[str] = []

    def begin(self, scope: str) -> None:
        """Start a new key scope (one per save): sequence numbers restart at 0."""
        self._scope = scope
        self._seq = 0

    def _key(self, kind: str, rank: int) -> str:
        return f"{self.prefix}{self._scope}/{self._seq}/{kind}/{rank}"

    def gather(self, obj: Any) -> list[Any] | None:
        self._seq += 1
        self.store.set(self._key("g", self.rank), pickle.dumps(obj))
        if self.rank != 0:
            return None
        keys = [self._key("g", r) for r in range(self.world_size)]
        self._wait(keys, list(range(self.world_size)))
        out = [pickle.loads(v) for v in self.store.get_many(keys)]
        # Every rank has posted this step, so all have read earlier broadcasts.
        self.store.delete_keys(keys + self._to_delete)
        self._to_delete.clear()
        return out

    def broadcast(self, obj: Any) -> Any:
        self._seq += 1
        key = self._key("b", 0)
        if self.rank == 0:
            self.store.set(key, pickle.dumps(obj))
            self._to_delete.append(key)
            return obj
        self._wait([key], [0])
        return pickle.loads(self.store.get(key))

    def scatter(self, objs: Sequence[Any] | None) -> Any:
        self._seq += 1
        if self.rank == 0:
            assert objs is not None
            for r in range(1, self.world_size):
                self.store.set(self._key("s", r), pickle.dumps(objs[r]))
            return objs[0]
        key = self._key("s", self.rank)
        self._wait([key], [0])
        out = pickle.loads(self.store.get(key))
        self.store.delete_key(key)
        return out

    def _wait(self, keys: list[str], ranks: list[int]) -> None:
        # The server holds the request until the keys arrive or the deadline passes: no polling.
        missing = set(self.store.wait(keys, self.timeout))
        if missing:
            raise RankTimeoutError(
                self.step, [r for r, k in zip(ranks, keys, strict=True) if k in missing], self.timeout
            )


class _Guarded:
    """The store, with a lost connection reported as the workers' peer being gone.

    A raw ``ConnectionResetError`` says nothing about whose process went
    away; the user needs to hear it was rank 0's.
    """

    def __init__(self, store: StoreClient, comm: StoreComm, address: str) -> None:
        self._store = store
        self._comm = comm
        self._address = address

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._store, name)(*args)
        except OSError as exc:  # ConnectionError, and what the socket layer raises besides
            raise StoreLostError(self._comm.step, self._address, exc) from exc

    def set(self, key: str, value: bytes) -> None:
        self._call("set", key, value)

    def get(self, key: str) -> bytes:
        return self._call("get", key)  # type: ignore[no-any-return]

    def check(self, keys: list[str]) -> bool:
        return self._call("check", keys)  # type: ignore[no-any-return]

    def get_many(self, keys: list[str]) -> list[bytes]:
        return self._call("get_many", keys)  # type: ignore[no-any-return]

    def delete_key(self, key: str) -> bool:
        return self._call("delete_key", key)  # type: ignore[no-any-return]

    def delete_keys(self, keys: list[str]) -> int:
        return self._call("delete_keys", keys)  # type: ignore[no-any-return]

    def wait(self, keys: list[str], timeout: float) -> list[str]:
        return self._call("wait", keys, timeout)  # type: ignore[no-any-return]
