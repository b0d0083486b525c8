"""The workers' store-based collectives, against a real TCPStore on loopback."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist

from async_ckpt.worker.comm import RankTimeoutError, StoreComm, StoreLostError


def _server() -> Any:
    return dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10)
    )


def _client(port: int) -> Any:
    return dist.TCPStore(
        "127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=10)
    )


def _comms(port: int, world: int, timeout: float = 10.0) -> list[StoreComm]:
    return [
        StoreComm(_client(port), r, world, timeout=timeout, address=f"127.0.0.1:{port}") for r in range(world)
    ]


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


def test_gather_broadcast_scatter_and_keys_cleaned() -> None:
    server = _server()
    comms = _comms(server.port, 3)

    def step(c: StoreComm) -> Any:
        c.begin("save7")
        got = c.gather({"rank": c.rank})
        b = c.broadcast("plan" if c.rank == 0 else None)
        s = c.scatter([f"to{r}" for r in range(3)] if c.rank == 0 else None)
        c.gather(None)  # the next step deletes the broadcast key
        return got, b, s

    results = _on_ranks(comms, step)
    assert results[0][0] == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
    assert [r[1] for r in results] == ["plan"] * 3
    assert [r[2] for r in results] == ["to0", "to1", "to2"]
    assert all(r[0] is None for r in results[1:])
    assert server.num_keys() <= 1  # only the store's own bookkeeping key


def test_missing_rank_is_named_after_the_timeout() -> None:
    server = _server()
    comms = _comms(server.port, 3, timeout=0.5)
    comms[0].step = "save planning"
    comms[1].gather("here")
    with pytest.raises(
        RankTimeoutError, match=r"save planning: rank\(s\) 2 did not respond within 0.5s"
    ) as e:
        comms[0].gather("here")
    assert e.value.ranks == [2]


def test_lost_store_names_rank_zero() -> None:
    server = _server()
    port = server.port
    comm = _comms(port, 2)[1]
    comm.step = "commit"
    del server  # rank 0's trainer closed its checkpointer, or died
    want = rf"commit: lost the connection to the workers' store at 127.0.0.1:{port}, which rank 0's"
    with pytest.raises(StoreLostError, match=want):
        comm.broadcast(None)
