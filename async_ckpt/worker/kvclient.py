"""The workers' side of their key/value store: a blocking client (the server is ``kvstore.py``)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable

from . import kvwire as wire

__all__ = ["StoreClient"]


class StoreClient:
    """A blocking connection to a ``StoreServer``; safe to share between threads.

    Every failure to reach the server, or an answer that does not come within
    ``timeout`` seconds, raises ``ConnectionError``, and the client stays
    broken: a request cut off half way leaves the stream out of step.
    """

    def __init__(self, host: str, port: int, secret: str | None, timeout: float) -> None:
        self.address = f"{host}:{port}"
        self.timeout = timeout
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._sock_timeout = timeout
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectionError(f"cannot connect to the store at {self.address}: {exc}") from exc
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._call(wire.AUTH, (secret or "").encode())
        except ConnectionError as exc:
            raise ConnectionError(f"the store at {self.address} refused this connection ({exc})") from None

    def set(self, key: str, value: bytes) -> None:
        self._call(wire.SET, key.encode(), value)

    def get(self, key: str) -> bytes:
        status, payload = self._call(wire.GET, key.encode(), allow_missing=True)
        if status == wire.MISSING:
            raise KeyError(key)
        return payload

    def check(self, keys: Iterable[str]) -> bool:
        return self._call(wire.CHECK, *(k.encode() for k in keys))[1] == b"\x01"

    def get_many(self, keys: Iterable[str]) -> list[bytes]:
        """The values of ``keys``, in one round trip; ``KeyError`` naming the first one missing."""
        status, payload = self._call(wire.GET_MANY, *(k.encode() for k in keys), allow_missing=True)
        if status == wire.MISSING:
            raise KeyError(payload.decode())
        return wire.split(memoryview(payload))

    def delete_key(self, key: str) -> bool:
        return self._call(wire.DELETE, key.encode())[1] == b"\x01"

    def delete_keys(self, keys: Iterable[str]) -> int:
        """Delete ``keys`` in one round trip; how many existed."""
        return int(wire.LEN.unpack(self._call(wire.DELETE_MANY, *(k.encode() for k in keys))[1])[0])

    def wait(self, keys: Iterable[str], timeout: float) -> list[str]:
        """Block until every key is set, or ``timeout`` passes; return the keys still missing."""
        # The server answers at the deadline: give it that long plus our usual margin.
        fields = [k.encode() for k in keys]
        _, payload = self._call(wire.WAIT, wire.WAIT_TIMEOUT.pack(timeout), *fields, wait_for=timeout)
        return [k.decode() for k in wire.split(memoryview(payload))]

    def close(self) -> None:
        # Not under the lock: another thread may be parked in a wait for as long as its timeout.
        # shutdown() wakes it (close() alone would not); it then raises ConnectionError.
        self._broken = self._broken or "closed by this process"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _call(
        self, op: int, *fields: bytes, allow_missing: bool = False, wait_for: float = 0.0
    ) -> tuple[int, bytes]:
        body = bytes([op]) + wire.fields(*fields)
        with self._lock:
            if self._broken is not None:
                raise ConnectionError(
                    f"the connection to the store at {self.address} is gone: {self._broken}"
                )
            try:
                if self._sock_timeout != self.timeout + wait_for:
                    self._sock_timeout = self.timeout + wait_for
                    self._sock.settimeout(self._sock_timeout)
                self._sock.sendall(wire.LEN.pack(len(body)) + body)
                reply = self._recv_reply()
            except TimeoutError as exc:
                self._break(f"no answer within {self.timeout + wait_for:g}s")
                raise ConnectionError(f"the store at {self.address} gave {self._broken}") from exc
            except OSError as exc:
                self._break(f"{type(exc).__name__}: {exc}")
                if isinstance(exc, ConnectionError):
                    raise
                raise ConnectionError(f"the store at {self.address}: {exc}") from exc
        status = reply[0] if reply else wire.BAD
        if status == wire.OK or (status == wire.MISSING and allow_missing):
            return status, bytes(reply[1:])
        raise ValueError(f"the store at {self.address} refused request {chr(op)!r}")

    def _break(self, why: str) -> None:
        self._broken = why
        self._sock.close()

    def _recv_reply(self) -> bytes | bytearray:
        # The server sends nothing but the one reply to our one request, so a
        # large first read cannot take bytes that belong to a later reply.
        first = b""
        while len(first) < 4:
            more = self._sock.recv(wire.RECV)
            if not more:
                raise ConnectionResetError("the store closed the connection")
            first += more
        (n,) = wire.LEN.unpack_from(first)
        if len(first) == 4 + n:
            return first[4:]
        buf = bytearray(n)
        with memoryview(buf) as view:
            view[: len(first) - 4] = first[4:]
            at = len(first) - 4
            while at < n:
                got = self._sock.recv_into(view[at:])
                if not got:
                    raise ConnectionResetError("the store closed the connection")
                at += got
        return buf
