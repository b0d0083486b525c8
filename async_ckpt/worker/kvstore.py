"""The workers' own key/value store: the server, hosted by rank 0's trainer.

Rank 0's trainer hosts it (``worker/group.py``); every rank's worker connects
to it with ``kvclient.StoreClient`` (``worker/main.py``) and runs its
collectives over it (``worker/comm.py``). It replaces
``torch.distributed.TCPStore`` there so that a worker need not import torch.

The server shares the trainer's GIL with training, so it is one daemon
thread multiplexing every connection with ``selectors`` (thousands of ranks,
one thread), does little per request, and sleeps in ``select`` until a
socket is ready or the nearest parked wait's deadline. ``wait`` is answered by
the server when the keys arrive or the deadline passes: no client polls.

The values are pickles made by ``StoreComm``, so a connection must first
present the secret that rank 0 published through the trainer's rendezvous
store; one that does not is closed unserved. Wire format: ``kvwire.py``.
"""

from __future__ import annotations

import heapq
import hmac
import itertools
import logging
import os
import secrets
import selectors
import socket
import struct
import threading
import time
import weakref

from . import kvwire as wire
from .kvclient import StoreClient

__all__ = ["StoreClient", "StoreServer"]

log = logging.getLogger("async_ckpt")


class StoreServer:
    """Listens on all interfaces, on a port the OS picks; ``close()`` stops it.

    Dropping the last reference stops it too, as a ``TCPStore`` going away would.
    """

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret if secret is not None else secrets.token_hex(16)
        self._loop = _Loop(self.secret.encode())
        self.port: int = self._loop.port
        self._stop = weakref.finalize(self, self._loop.stop)
        # Not at interpreter exit: a checkpointer's own close at exit may still be committing
        # a save whose workers need the store. The daemon thread ends with the process.
        self._stop.atexit = False
        threading.Thread(target=self._loop.run, name="async_ckpt-store", daemon=True).start()

    def num_keys(self) -> int:
        return len(self._loop.data)

    def close(self) -> None:
        self._stop()


class _Conn:
    __slots__ = ("authed", "inbox", "outbox", "parked", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.authed = False
        self.inbox = bytearray()
        self.outbox: list[memoryview] = []
        self.parked: _Parked | None = None


class _Parked:
    """A wait the server answers later: when its keys are all set, or at its deadline."""

    __slots__ = ("conn", "deadline", "done", "keys", "remaining")

    def __init__(self, conn: _Conn, keys: list[str], remaining: set[str], deadline: float) -> None:
        self.conn = conn
        self.keys = keys
        self.remaining = remaining
        self.deadline = deadline
        self.done = False


class _Loop:
    """The server's state; only its thread touches it, but for ``stop()``."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.data: dict[str, bytes] = {}
        self._waiters: dict[str, set[_Parked]] = {}
        self._deadlines: list[tuple[float, int, _Parked]] = []
        self._stale = 0
        """Entries of ``_deadlines`` whose wait was answered before its deadline."""
        self._tie = itertools.count()
        self._conns: dict[socket.socket, _Conn] = {}
        self._resume: list[_Conn] = []
        self._sel = selectors.DefaultSelector()
        self._listener = _listen()
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._finished = threading.Event()
        self._pid = os.getpid()

    def stop(self) -> None:
        if os.getpid() != self._pid:
            return  # a fork() of the trainer: the thread, and the store, are the parent's
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._finished.wait(30)

    def run(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._sel.select(self._select_timeout()):
                    sock = key.fileobj
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_r:
                        pass
                    else:
                        conn = self._conns.get(sock)  # type: ignore[call-overload]
                        if conn is not None and events & selectors.EVENT_WRITE:
                            self._flush(conn)
                        if conn is not None and events & selectors.EVENT_READ and conn.sock in self._conns:
                            self._read(conn)
                self._expire(time.monotonic())
                while self._resume:
                    self._serve(self._resume.pop())
        except Exception:
            # The workers hear it as a lost store (StoreLostError); the cause is only here.
            log.exception("async_ckpt: the workers' store stopped")
        finally:
            self._shutdown()

    def _select_timeout(self) -> float | None:
        if not self._deadlines:
            return None
        return max(0.0, self._deadlines[0][0] - time.monotonic())

    def _shutdown(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()
        self._finished.set()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # out of descriptors, say: the peer sees a refusal and we go on serving
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock)
            self._conns[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ)

    def _drop(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock, None) is None:
            return
        if conn.parked is not None:
            self._unpark(conn.parked)
        self._sel.unregister(conn.sock)
        # shutdown() as well as close(): a fork() of the trainer may hold the descriptor too,
        # and the worker must hear that the store is gone.
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.sock.close()

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(wire.RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        conn.inbox += chunk
        self._serve(conn)

    def _serve(self, conn: _Conn) -> None:
        """Answer the complete requests in the inbox, in order; a parked wait holds the rest."""
        at = 0
        box = conn.inbox
        while conn.parked is None and conn.sock in self._conns and len(box) - at >= 4:
            (n,) = wire.LEN.unpack_from(box, at)
            if n > (wire.MAX_FRAME if conn.authed else wire.MAX_AUTH_FRAME):
                self._drop(conn)
                return
            if len(box) - at - 4 < n:
                break
            with memoryview(box) as view:
                frame = view[at + 4 : at + 4 + n]
                try:
                    self._request(conn, frame)
                except (ValueError, UnicodeDecodeError, struct.error):
                    self._reply(conn, wire.BAD, b"")
                finally:
                    frame.release()
            at += 4 + n
        if at:
            del box[:at]

    def _request(self, conn: _Conn, frame: memoryview) -> None:
        if not frame:
            raise ValueError("empty frame")
        op, fields = frame[0], wire.split(frame[1:])
        if not conn.authed:
            if op == wire.AUTH and len(fields) == 1 and hmac.compare_digest(fields[0], self.secret):
                conn.authed = True
                self._reply(conn, wire.OK, b"")
            else:
                self._drop(conn)
            return
        if op == wire.SET and len(fields) == 2:
            key = fields[0].decode()
            self.data[key] = fields[1]
            self._arrived(key)
            self._reply(conn, wire.OK, b"")
        elif op == wire.GET and len(fields) == 1:
            value = self.data.get(fields[0].decode())
            self._reply(conn, wire.OK if value is not None else wire.MISSING, value or b"")
        elif op == wire.CHECK:
            self._reply(conn, wire.OK, bytes([all(f.decode() in self.data for f in fields)]))
        elif op == wire.GET_MANY:
            keys = [f.decode() for f in fields]
            missing = [k for k in keys if k not in self.data]
            if missing:
                self._reply(conn, wire.MISSING, missing[0].encode())
            else:
                self._reply(conn, wire.OK, wire.fields(*(self.data[k] for k in keys)))
        elif op == wire.DELETE and len(fields) == 1:
            self._reply(conn, wire.OK, bytes([self.data.pop(fields[0].decode(), None) is not None]))
        elif op == wire.DELETE_MANY:
            gone = sum(self.data.pop(f.decode(), None) is not None for f in fields)
            self._reply(conn, wire.OK, wire.LEN.pack(gone))
        elif op == wire.WAIT and fields:
            (timeout,) = wire.WAIT_TIMEOUT.unpack(fields[0])
            keys = [f.decode() for f in fields[1:]]
            remaining = {k for k in keys if k not in self.data}
            if not remaining:
                self._reply(conn, wire.OK, b"")
                return
            parked = _Parked(conn, keys, remaining, time.monotonic() + max(0.0, timeout))
            conn.parked = parked
            for k in remaining:
                self._waiters.setdefault(k, set()).add(parked)
            heapq.heappush(self._deadlines, (parked.deadline, next(self._tie), parked))
        else:
            raise ValueError(f"bad request {op!r}")

    def _arrived(self, key: str) -> None:
        for parked in self._waiters.pop(key, ()):
            parked.remaining.discard(key)
            if not parked.remaining:
                self._answer(parked)

    def _expire(self, now: float) -> None:
        heap = self._deadlines
        while heap and (heap[0][2].done or heap[0][0] <= now):
            _, _, parked = heapq.heappop(heap)
            if not parked.done:
                self._answer(parked)
            self._stale -= 1  # done by now, and counted in _unpark
        # Waits answered early stay in the heap until their deadline; rebuild it if they pile up.
        if self._stale > 64 and self._stale > len(heap) // 2:
            self._deadlines = [e for e in heap if not e[2].done]
            heapq.heapify(self._deadlines)
            self._stale = 0

    def _answer(self, parked: _Parked) -> None:
        conn = parked.conn
        self._unpark(parked)
        missing = [k for k in parked.keys if k not in self.data]
        self._reply(conn, wire.OK, wire.fields(*(k.encode() for k in missing)))
        if conn.inbox:
            self._resume.append(conn)  # requests that came in behind the wait

    def _unpark(self, parked: _Parked) -> None:
        parked.done = True
        self._stale += 1
        parked.conn.parked = None
        for k in parked.remaining:
            waiting = self._waiters.get(k)
            if waiting is not None:
                waiting.discard(parked)
                if not waiting:
                    del self._waiters[k]

    def _reply(self, conn: _Conn, status: int, payload: bytes) -> None:
        if conn.sock not in self._conns:
            return
        was_idle = not conn.outbox
        head = wire.LEN.pack(len(payload) + 1) + bytes([status])
        if len(payload) <= wire.RECV:  # one send, one packet, one recv on the other side
            conn.outbox.append(memoryview(head + payload))
        else:  # not copied
            conn.outbox += (memoryview(head), memoryview(payload))
        if was_idle:
            self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        box = conn.outbox
        while box:
            try:
                sent = conn.sock.send(box[0])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return
            if sent < len(box[0]):
                box[0] = box[0][sent:]
                break
            box.pop(0)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if box else 0)
        if self._sel.get_key(conn.sock).events != events:
            self._sel.modify(conn.sock, events)


def _listen() -> socket.socket:
    """All interfaces, IPv6 too where the host has it (the advertised address may be either)."""
    if socket.has_dualstack_ipv6():
        try:
            return socket.create_server(("", 0), family=socket.AF_INET6, backlog=4096, dualstack_ipv6=True)
        except OSError:
            pass
    return socket.create_server(("0.0.0.0", 0), backlog=4096)
