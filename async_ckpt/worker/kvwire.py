"""The wire format of the workers' key/value store (``kvstore.py`` serves it, ``kvclient.py`` speaks it).

Both ways: a 4-byte big-endian length, then the frame. A request frame is an
op byte and length-prefixed fields; a reply frame is a status byte and the
op's result. The first request on a connection must be ``AUTH`` with the
store's secret.
"""

from __future__ import annotations

import struct

LEN = struct.Struct(">I")
WAIT_TIMEOUT = struct.Struct(">d")
AUTH, SET, GET, GET_MANY, CHECK, DELETE, DELETE_MANY, WAIT = b"ASGMCDXW"
OK, MISSING, BAD = 0, 1, 2
MAX_FRAME = 1 << 31
MAX_AUTH_FRAME = 256
"""Before the secret, a peer gets no more memory than a secret needs."""
RECV = 1 << 18


def fields(*parts: bytes) -> bytes:
    return b"".join(LEN.pack(len(p)) + p for p in parts)


def split(body: memoryview) -> list[bytes]:
    out, at = [], 0
    while at < len(body):
        (n,) = LEN.unpack_from(body, at)
        at += 4
        if at + n > len(body):
            raise ValueError("truncated field")
        out.append(bytes(body[at : at + n]))
        at += n
    return out
