"""The workers' own key/value store (``worker/kvstore.py``): real sockets, real threads."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from async_ckpt.worker.kvstore import StoreClient, StoreServer


@contextlib.contextmanager
def _client(server: StoreServer, timeout: float = 10.0) -> Iterator[StoreClient]:
    c = StoreClient("127.0.0.1", server.port, server.secret, timeout)
    try:
        yield c
    finally:
        c.close()


def test_set_get_check_delete(server: StoreServer) -> None:
    with _client(server) as c:
        c.set("a", b"1")
        c.set("big", bytes(range(256)) * 40_000)  # spans many recv()s both ways
        c.set("empty", b"")
        assert c.get("a") == b"1"
        assert c.get("big") == bytes(range(256)) * 40_000
        assert c.get("empty") == b""
        c.set("a", b"2")
        assert c.get("a") == b"2"
        assert c.check(["a", "big"]) is True
        assert c.check(["a", "nope"]) is False
        assert c.delete_key("a") is True
        assert c.delete_key("a") is False
        assert c.check(["a"]) is False
        with pytest.raises(KeyError, match="'a'"):
            c.get("a")
        c.set("é/ключ", b"x")  # keys are text, not only ASCII
        assert c.get("é/ключ") == b"x"


def test_get_many_and_delete_keys_take_one_round_trip_each(server: StoreServer) -> None:
    with _client(server) as c:
        for i in range(5):
            c.set(f"m/{i}", f"v{i}".encode())
        assert c.get_many([f"m/{i}" for i in (3, 0, 4)]) == [b"v3", b"v0", b"v4"]
        assert c.get_many([]) == []
        with pytest.raises(KeyError, match="'m/9'"):
            c.get_many(["m/1", "m/9"])
        assert c.delete_keys(["m/0", "m/1", "m/9"]) == 2
        assert c.check(["m/2", "m/3", "m/4"]) and not c.check(["m/0"]) and not c.check(["m/1"])


def test_wait_returns_at_once_when_the_keys_exist(server: StoreServer) -> None:
    with _client(server) as c:
        c.set("k1", b"")
        c.set("k2", b"")
        assert c.wait(["k1", "k2"], 60.0) == []


def test_wait_is_answered_when_another_client_sets_the_keys(server: StoreServer) -> None:
    with _client(server) as waiter, _client(server) as setter:
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(waiter.wait(["x", "y"], 60.0)))
        t.start()
        setter.set("x", b"1")
        setter.set("y", b"2")
        t.join(30)
        assert got == [[]]


def test_wait_returns_the_missing_keys_at_its_timeout(server: StoreServer) -> None:
    with _client(server, timeout=0.1) as c:
        c.set("here", b"")
        # The socket timeout (0.1 s) is shorter than the wait: the wait must still be answered.
        assert c.wait(["gone1", "here", "gone2"], 0.5) == ["gone1", "gone2"]
        c.set("after", b"ok")  # the connection is still in step
        assert c.get("after") == b"ok"


def test_waits_answered_early_do_not_pile_up_on_the_server(server: StoreServer) -> None:
    # Each wait is parked (its key is set only once the server holds it), then answered
    # long before its deadline; the server's deadline heap must not keep them all.
    n = 300
    with _client(server) as waiter, _client(server) as setter, _client(server) as first:
        # A wait with an earlier deadline, pending throughout, keeps the others off the heap's top.
        pending = threading.Thread(target=first.wait, args=(["last"], 1800.0))
        pending.start()
        while "last" not in server._loop._waiters:
            time.sleep(0.001)
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.extend(waiter.wait([f"e/{i}"], 3600.0) for i in range(n)))
        t.start()
        for i in range(n):
            while f"e/{i}" not in server._loop._waiters:  # parked on the server
                time.sleep(0.001)
            setter.set(f"e/{i}", b"")
        t.join(60)
        assert got == [[]] * n
        assert len(server._loop._deadlines) <= 2 * 64 + 1
        assert waiter.wait(["e/0", "never"], 0.2) == ["never"]  # and deadlines still work
        setter.set("last", b"")
        pending.join(60)


def test_many_clients_at_once(server: StoreServer) -> None:
    n = 64
    clients = [StoreClient("127.0.0.1", server.port, server.secret, 30.0) for _ in range(n)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            c = clients[i]
            c.set(f"r/{i}", str(i).encode())
            assert c.wait([f"r/{j}" for j in range(n)], 60.0) == []
            assert [int(c.get(f"r/{j}")) for j in range(n)] == list(range(n))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for c in clients:
            c.close()
    assert errors == []


def test_wrong_secret_is_refused_and_others_are_served(server: StoreServer) -> None:
    with _client(server) as good:
        good.set("k", b"v")
        with pytest.raises(ConnectionError, match="refused"):
            StoreClient("127.0.0.1", server.port, "not-the-secret", 10.0)
        with pytest.raises(ConnectionError):
            StoreClient("127.0.0.1", server.port, None, 10.0)
        assert good.get("k") == b"v"
        with _client(server) as late:
            assert late.get("k") == b"v"


def test_closed_server_fails_the_next_op_and_a_parked_wait(server: StoreServer) -> None:
    with _client(server) as c, _client(server) as parked:
        c.set("k", b"v")
        got: list[Any] = []

        def wait() -> None:
            try:
                got.append(parked.wait(["never"], 60.0))
            except BaseException as exc:  # noqa: BLE001 - checked below
                got.append(exc)

        t = threading.Thread(target=wait)
        t.start()
        server.close()
        server.close()  # idempotent
        t.join(30)
        assert len(got) == 1 and isinstance(got[0], ConnectionError)
        with pytest.raises(ConnectionError):
            c.get("k")
        with pytest.raises(ConnectionError):
            c.set("k", b"w")  # and every op after it
    with pytest.raises(ConnectionError):
        StoreClient("127.0.0.1", server.port, server.secret, 10.0)


def test_the_store_path_imports_no_torch() -> None:
    code = (
        "import sys, async_ckpt.worker.kvstore, async_ckpt.worker.comm\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy'))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.ranks(2)
def test_worker_group_publishes_address_and_secret(rank: Any) -> None:
    from async_ckpt.worker.group import join_worker_group

    groups = [join_worker_group(None, 30.0) for _ in range(2)]  # a second checkpointer's group too
    for g in groups:
        assert g.secret is not None and g.port is not None and g.host is not None
        with contextlib.closing(StoreClient(g.host, g.port, g.secret, 30.0)) as c:
            c.set(f"hello/{rank.rank}", b"")
            assert c.wait(["hello/0", "hello/1"], 30.0) == []
    assert groups[0].port != groups[1].port and groups[0].secret != groups[1].secret
    rank.barrier()
    for g in groups:
        g.close()
        g.close()  # idempotent
    if rank.rank == 0:
        with pytest.raises(ConnectionError):
            StoreClient(groups[0].host or "", groups[0].port or 0, groups[0].secret, 10.0)


def test_close_wakes_a_wait_parked_in_another_thread(server: StoreServer) -> None:
    c = StoreClient("127.0.0.1", server.port, server.secret, 10.0)
    got: list[Any] = []

    def wait() -> None:
        try:
            got.append(c.wait(["never"], 600.0))
        except BaseException as exc:  # noqa: BLE001 - checked below
            got.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    while "never" not in server._loop._waiters:
        time.sleep(0.001)
    c.close()
    t.join(30)
    assert len(got) == 1 and isinstance(got[0], ConnectionError)
