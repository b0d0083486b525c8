"""Non-tensor values as tagged JSON, so that reading them never unpickles.

``int``, ``bool``, ``str`` and ``None`` are JSON as they are; what JSON cannot
spell (NaN, infinities, ``bytes``, ints too long for a decimal conversion) and
types JSON would lose (``torch.Size``) are wrapped in a one-key object whose
key is a ``$`` tag. Other objects are pickled only when the caller opts in
with ``allow_pickle``. See docs/format.md section 4.
"""

from __future__ import annotations

import base64
import math
import pickle
import re
from typing import Any

import torch

from ..errors import CheckpointError, CorruptCheckpointError

__all__ = ["PickleRefusedError", "decode_value", "encode_value", "is_plain_value"]

_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Ints of more bits than this go as hex: 2**2048 has 617 decimal digits, under
# the lowest limit sys.set_int_max_str_digits accepts (640), so json's decimal
# conversion never trips it at save or load. Hex is a power-of-two base, which
# Python converts in linear time with no digit limit.
_BIG_INT_BITS = 2048
_HEX_INT = re.compile(r"-?[1-9a-f][0-9a-f]*")


class PickleRefusedError(CheckpointError):
    """The checkpoint holds pickled data and the caller did not allow unpickling."""


def is_plain_value(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes))


def encode_value(value: object, *, fqn: str, allow_pickle: bool) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if value.bit_length() > _BIG_INT_BITS:
            return {"$int": format(value, "x")}
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, torch.Size):
        return {"$size": list(value)}
    if allow_pickle:
        return {"$pickle": _pickled(value, fqn)}
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
        if tag == "$int" and isinstance(payload, str) and _HEX_INT.fullmatch(payload):
            return int(payload, 16)
        if tag == "$size" and isinstance(payload, list) and all(_is_dim(d) for d in payload):
            return torch.Size(payload)
        if tag == "$pickle" and isinstance(payload, str):
            if not allow_pickle:
                raise PickleRefusedError(
                    f"key '{fqn}' holds pickled data; unpickling runs code from the file. "
                    "Pass allow_pickle=True to load() only if you trust this checkpoint."
                )
            return pickle.loads(_b64(payload, fqn))
    raise CorruptCheckpointError(f"key '{fqn}': malformed value encoding {str(encoded)[:80]!r}")


def _pickled(value: object, fqn: str) -> str:
    try:
        data = pickle.dumps(value)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        # Pickle's own message names the object's type or function, never where it sits.
        raise TypeError(
            f"cannot save key '{fqn}': allow_pickle=True, but its {type(value).__qualname__} "
            f"value cannot be pickled ({exc}). Replace it with picklable data or drop the key."
        ) from exc
    return base64.b64encode(data).decode("ascii")


def _is_dim(d: object) -> bool:
    return type(d) is int and d >= 0


def _b64(payload: str, fqn: str) -> bytes:
    try:
        return base64.b64decode(payload.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise CorruptCheckpointError(f"key '{fqn}': invalid base64 payload") from exc
