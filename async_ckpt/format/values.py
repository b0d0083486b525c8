"""Non-tensor values as tagged JSON, so that reading them never unpickles.

``int``, ``bool``, ``str`` and ``None`` are JSON as they are; floats that JSON
cannot spell (NaN, infinities) and ``bytes`` are wrapped in a one-key object.
Other objects are pickled only when the caller opts in with ``allow_pickle``.
"""

from __future__ import annotations

import base64
import math
import pickle
from typing import Any

from ..errors import CheckpointError, CorruptCheckpointError

__all__ = ["PickleRefusedError", "decode_value", "encode_value", "is_plain_value"]

_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class PickleRefusedError(CheckpointError):
    """The checkpoint holds pickled data and the caller did not allow unpickling."""


def is_plain_value(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes))


def encode_value(value: object, *, fqn: str, allow_pickle: bool) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if allow_pickle:
        return {"$pickle": base64.b64encode(pickle.dumps(value)).decode("ascii")}
    raise TypeError(
        f"cannot save key '{fqn}': values of type {type(value).__qualname__} are not "
        "supported without pickle. Convert it to a tensor, number, str, bytes or a "
        "dict/list of those, or pass allow_pickle=True to save it (and to load it back)."
    )


def decode_value(encoded: Any, *, fqn: str, allow_pickle: bool) -> Any:
    if encoded is None or isinstance(encoded, (bool, int, float, str)):
        return encoded
    if isinstance(encoded, dict) and len(encoded) == 1:
        ((tag, payload),) = encoded.items()
        if tag == "$float" and payload in _FLOATS:
            return _FLOATS[payload]
        if tag == "$bytes" and isinstance(payload, str):
            return _b64(payload, fqn)
        if tag == "$pickle" and isinstance(payload, str):
            if not allow_pickle:
                raise PickleRefusedError(
                    f"key '{fqn}' holds pickled data; unpickling runs code from the file. "
                    "Pass allow_pickle=True to load() only if you trust this checkpoint."
                )
            return pickle.loads(_b64(payload, fqn))
    raise CorruptCheckpointError(f"key '{fqn}': malformed value encoding {str(encoded)[:80]!r}")


def _b64(payload: str, fqn: str) -> bytes:
    try:
        return base64.b64decode(payload.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise CorruptCheckpointError(f"key '{fqn}': invalid base64 payload") from exc
