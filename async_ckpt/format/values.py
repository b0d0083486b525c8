"""Non-tensor values as tagged JSON, so that reading them never unpickles.

``int``, ``bool``, ``str`` and ``None`` are JSON as they are, and so is a
list; what JSON cannot spell (NaN, infinities, ``bytes``, ints too long for a
decimal conversion) and types JSON would lose (tuples, dicts with any keys,
``torch.Size``, and the kinds in ``value_kinds``) are wrapped in a one-key
object whose key is a ``$`` tag. Other objects are pickled only when the
caller opts in with ``allow_pickle``. See docs/format.md section 4.
"""

from __future__ import annotations

import base64
import math
import pickle
import re
from typing import Any

import torch

from ..errors import CheckpointError, CorruptCheckpointError
from .value_kinds import DECODERS, Context, Malformed, encode_kind

__all__ = ["PickleRefusedError", "decode_value", "encode_value", "is_plain_value"]

_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Ints of more bits than this go as hex: 2**2048 has 617 decimal digits, under
# the lowest limit sys.set_int_max_str_digits accepts (640), so json's decimal
# conversion never trips it at save or load. Hex is a power-of-two base, which
# Python converts in linear time with no digit limit.
_BIG_INT_BITS = 2048
_HEX_INT = re.compile(r"-?[1-9a-f][0-9a-f]*")
# Containers inside one value (a list of tuples, a Namespace of lists).
_MAX_DEPTH = 64


class PickleRefusedError(CheckpointError):
    """The checkpoint holds pickled data and the caller did not allow unpickling."""


def is_plain_value(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, bytes))


def encode_value(value: object, *, fqn: str, allow_pickle: bool) -> Any:
    """The JSON encoding of one value; TypeError naming ``fqn`` for what cannot be saved."""
    t = type(value)  # the common leaves first: this runs for every value of every save
    if value is None or t is bool or t is str or (t is float and math.isfinite(value)):  # type: ignore[arg-type]
        return value
    if t is int and value.bit_length() <= _BIG_INT_BITS:  # type: ignore[attr-defined]
        return value
    return _encode(value, fqn, allow_pickle, 0)


def _encode(value: object, fqn: str, allow_pickle: bool, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise TypeError(f"cannot save key '{fqn}': a value nested over {_MAX_DEPTH} levels (a cycle?)")

    def nested(v: object) -> Any:
        # encode_value's fast path: an optimizer's param_groups hold lists of ints.
        t = type(v)
        if v is None or t is bool or t is str or (t is float and math.isfinite(v)):  # type: ignore[arg-type]
            return v
        if t is int and v.bit_length() <= _BIG_INT_BITS:  # type: ignore[attr-defined]
            return v
        return _encode(v, fqn, allow_pickle, depth + 1)

    try:
        # Before int, float, str and tuple: enums, numpy scalars and torch.Size subclass them.
        encoded = encode_kind(value, nested)
    except TypeError as exc:
        if str(exc).startswith("cannot save key"):
            raise
        raise TypeError(f"cannot save key '{fqn}': {exc}") from None
    if encoded is not None:
        return encoded
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return {"$int": format(value, "x")} if value.bit_length() > _BIG_INT_BITS else int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, torch.Size):
        return {"$size": list(value)}
    t = type(value)
    # Exact types only: a subclass (OrderedDict, a namedtuple) would load as its base.
    if t is list:
        return [nested(v) for v in value]  # type: ignore[attr-defined]
    if t is tuple:
        return {"$tuple": [nested(v) for v in value]}  # type: ignore[attr-defined]
    if t is dict:
        return {"$dict": [[nested(k), nested(v)] for k, v in value.items()]}  # type: ignore[attr-defined]
    if allow_pickle:
        return {"$pickle": _pickled(value, fqn)}
    raise TypeError(
        f"cannot save key '{fqn}': values of type {type(value).__qualname__} are not "
        "supported without pickle. Convert it to a tensor, number, str, bytes or a "
        "dict/list of those, or pass allow_pickle=True to save it (and to load it back)."
    )


_NO_TARGET = object()


def decode_value(encoded: Any, *, fqn: str, allow_pickle: bool, like: Any = None) -> Any:
    """The value ``encoded`` stands for; ``like`` is the load target's current value, if any.

    An enum member is restored only into a target holding a member of the same
    enum; otherwise it decodes to its raw value.
    """
    try:
        return _decode(encoded, fqn, allow_pickle, like, 0)
    except (Malformed, ValueError, TypeError, ArithmeticError, RuntimeError) as exc:
        # RuntimeError: torch.device refusing a device type; ArithmeticError: decimal.
        if isinstance(exc, CheckpointError):
            raise
        raise CorruptCheckpointError(
            f"key '{fqn}': malformed value encoding {_preview(encoded)} ({exc})"
        ) from None


def _decode(encoded: Any, fqn: str, allow_pickle: bool, like: Any, depth: int) -> Any:
    if encoded is None or isinstance(encoded, (bool, int, float, str)):
        return encoded
    if depth > _MAX_DEPTH:
        raise Malformed(f"nested over {_MAX_DEPTH} levels")

    def nested(e: Any) -> Any:
        return _decode(e, fqn, allow_pickle, None, depth + 1)

    if isinstance(encoded, list):
        return [nested(e) for e in encoded]
    if not isinstance(encoded, dict) or len(encoded) != 1:
        raise Malformed("not a one-key object")
    ((tag, payload),) = encoded.items()
    if tag == "$float" and payload in _FLOATS:
        return _FLOATS[payload]
    if tag == "$bytes" and isinstance(payload, str):
        return _b64(payload)
    if tag == "$int" and isinstance(payload, str) and _HEX_INT.fullmatch(payload):
        return int(payload, 16)
    if tag == "$size" and isinstance(payload, list) and all(_is_dim(d) for d in payload):
        return torch.Size(payload)
    if tag == "$tuple" and isinstance(payload, list):
        return tuple(nested(e) for e in payload)
    if tag == "$dict" and isinstance(payload, list) and all(_is_pair(p) for p in payload):
        return {nested(k): nested(v) for k, v in payload}
    if tag == "$pickle" and isinstance(payload, str):
        if not allow_pickle:
            raise PickleRefusedError(
                f"key '{fqn}' holds pickled data; unpickling runs code from the file. "
                "Pass allow_pickle=True to load() only if you trust this checkpoint."
            )
        return pickle.loads(_b64(payload))
    decoder = DECODERS.get(tag)
    if decoder is None:
        raise Malformed(f"unknown tag {tag[:40]!r}" if tag.startswith("$") else "not a tag")
    return decoder(payload, Context(nested, like))


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


def _is_pair(p: object) -> bool:
    return isinstance(p, list) and len(p) == 2


def _b64(payload: str) -> bytes:
    try:
        return base64.b64decode(payload.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise Malformed("invalid base64") from exc


def _preview(encoded: Any) -> str:
    # Not str(encoded): a hostile payload may be huge.
    text = repr(encoded) if not isinstance(encoded, (dict, list)) else type(encoded).__name__
    if isinstance(encoded, dict) and len(encoded) == 1:
        text = f"{{{next(iter(encoded))[:40]!r}: ...}}"
    return text[:80]
