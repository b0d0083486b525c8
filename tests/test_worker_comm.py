"""The workers' store-based collectives, against a real ``StoreServer`` on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from async_ckpt.worker.comm import RankTimeoutError, StoreComm, StoreLostError
from async_ckpt.worker.kvstore import StoreClient, StoreServer


@pytest.fixture
def comms(server: StoreServer) -> Iterator[Any]:
    made: list[StoreClient] = []

    def make(world: int, timeout: float = 10.0) -> list[StoreComm]:
        out = []
        for r in range(world):
            client = StoreClient("127.0.0.1", server.port, server.secret, 10.0)
            made.append(client)
            out.append(StoreComm(client, r, world, timeout=timeout, address=f"127.0.0.1:{server.port}"))
        return out

    try:
        yield make
    finally:
        for c in made:
            c.close()


def _on_ranks(comms: list[StoreComm], fn: Any) -> list[Any]:
    out: list[Any] = [None] * len(comms)

    def run(r: int) -> None:
        try:
            out[r] = fn(comms[r])
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            out[r] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(comms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_gather_broadcast_scatter_and_keys_cleaned(server: StoreServer, comms: Any) -> None:
    ranks = comms(3)

    def step(c: StoreComm) -> Any:
        c.begin("save7")
        got = c.gather({"rank": c.rank})
        b = c.broadcast("plan" if c.rank == 0 else None)
        s = c.scatter([f"to{r}" for r in range(3)] if c.rank == 0 else None)
        c.gather(None)  # the next step deletes the broadcast key
        return got, b, s

    results = _on_ranks(ranks, step)
    assert results[0][0] == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
    assert [r[1] for r in results] == ["plan"] * 3
    assert [r[2] for r in results] == ["to0", "to1", "to2"]
    assert all(r[0] is None for r in results[1:])
    assert server.num_keys() == 0


def test_missing_rank_is_named_after_the_timeout(comms: Any) -> None:
    ranks = comms(3, timeout=0.5)
    ranks[0].step = "save planning"
    ranks[1].gather("here")
    with pytest.raises(
        RankTimeoutError, match=r"save planning: rank\(s\) 2 did not respond within 0.5s"
    ) as e:
        ranks[0].gather("here")
    assert e.value.ranks == [2]


def test_missing_rank_is_named_when_the_ranks_are_threads(comms: Any) -> None:
    ranks = comms(3, timeout=1.0)

    def step(c: StoreComm) -> Any:
        c.step = "commit"
        if c.rank == 2:
            return None  # this rank never posts
        return c.gather(c.rank)

    results = _on_ranks(ranks, step)
    assert isinstance(results[0], RankTimeoutError) and results[0].ranks == [2]
    assert "commit: rank(s) 2 did not respond within 1s" in str(results[0])
    assert results[1] is None


def test_lost_store_names_rank_zero(server: StoreServer, comms: Any) -> None:
    port = server.port
    comm = comms(2)[1]
    comm.step = "commit"
    server.close()  # rank 0's trainer closed its checkpointer, or died
    want = rf"commit: lost the connection to the workers' store at 127.0.0.1:{port}, which rank 0's"
    with pytest.raises(StoreLostError, match=want):
        comm.broadcast(None)


def test_store_closed_mid_collective_fails_the_waiting_ranks(server: StoreServer, comms: Any) -> None:
    ranks = comms(3, timeout=60.0)

    def step(c: StoreComm) -> Any:
        c.step = "save planning"
        return c.broadcast(None)  # rank 0 never broadcasts: ranks 1 and 2 are parked

    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(_on_ranks(ranks[1:], step)))
    t.start()
    time.sleep(0.5)  # let them park; not a timing assertion, the result is the same without it
    server.close()
    t.join(30)
    assert [type(e) for e in got[0]] == [StoreLostError, StoreLostError]
    assert "save planning: lost the connection to the workers' store" in str(got[0][0])
