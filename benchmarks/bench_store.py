"""One gather + broadcast + scatter round of ``StoreComm``, over the workers' store and over a TCPStore.

Ranks are threads of this process, each with its own connection, as the
workers of one host would be; a round runs from a barrier to the next one,
so it ends when every rank has its share. Three stores:

- ``kvstore``: ``worker/kvstore.py`` (what the workers use), waits answered by the server;
- ``tcpstore-poll``: ``torch.distributed.TCPStore`` with the polling wait StoreComm had before
  (``check`` then sleep 0.5 ms, doubling up to 20 ms);
- ``tcpstore-wait``: TCPStore with its own server-side ``wait``.

    PYTHONPATH=. python3 benchmarks/bench_store.py --ranks 8 --rounds 50

Prints the median and the 10th/90th percentiles of a round, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from async_ckpt.worker.comm import StoreComm
from async_ckpt.worker.kvstore import StoreClient, StoreServer


class _TcpPoll:
    """A TCPStore client with the polling wait StoreComm used with it."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def get_many(self, keys: list[str]) -> list[bytes]:
        return [self._store.get(k) for k in keys]  # as StoreComm did with it

    def delete_keys(self, keys: list[str]) -> int:
        return sum(bool(self._store.delete_key(k)) for k in keys)

    def wait(self, keys: list[str], timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while not self._store.check(keys):
            if time.monotonic() > deadline:
                return [k for k in keys if not self._store.check([k])]
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return []


class _TcpWait(_TcpPoll):
    def wait(self, keys: list[str], timeout: float) -> list[str]:
        self._store.wait(keys, timedelta(seconds=timeout))
        return []


def _clients(kind: str, world: int) -> tuple[list[Any], Callable[[], None]]:
    if kind == "kvstore":
        server = StoreServer()
        clients = [StoreClient("127.0.0.1", server.port, server.secret, 60.0) for _ in range(world)]

        def close() -> None:
            for c in clients:
                c.close()
            server.close()

        return clients, close
    import torch.distributed as dist

    master = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    wrap = _TcpPoll if kind == "tcpstore-poll" else _TcpWait
    out = [
        wrap(dist.TCPStore("127.0.0.1", master.port, is_master=False, timeout=timedelta(seconds=60)))
        for _ in range(world)
    ]
    return out, lambda: master.set("done", "")  # holds the server until the end


def measure(kind: str, world: int, rounds: int) -> list[float]:
    clients, close = _clients(kind, world)
    comms = [StoreComm(c, r, world, timeout=60.0) for r, c in enumerate(clients)]  # type: ignore[arg-type]
    times: list[float] = []
    start, end = threading.Barrier(world), threading.Barrier(world)

    def run(c: StoreComm) -> None:
        for i in range(rounds + 5):  # 5 rounds of warm-up
            c.begin(f"s{i}")
            start.wait()
            t0 = time.perf_counter()
            got = c.gather({"rank": c.rank, "plan": list(range(64))})
            c.broadcast(got if c.rank == 0 else None)
            c.scatter([r for r in range(world)] if c.rank == 0 else None)
            end.wait()  # the round ends when every rank has its share
            if c.rank == 0 and i >= 5:
                times.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(c,)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--stores", default="kvstore,tcpstore-poll,tcpstore-wait")
    args = ap.parse_args()
    for kind in args.stores.split(","):
        t = sorted(x * 1e3 for x in measure(kind, args.ranks, args.rounds))
        q = statistics.quantiles(t, n=10)
        print(
            f"{kind:14s} ranks={args.ranks} rounds={len(t)}: median {statistics.median(t):.2f} ms "
            f"(p10 {q[0]:.2f}, p90 {q[-1]:.2f})"
        )


if __name__ == "__main__":
    main()
