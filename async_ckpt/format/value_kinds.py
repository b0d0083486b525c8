"""Tagged-JSON encodings of torch, standard-library and numpy value types (docs/format.md section 4).

Each kind round-trips to its exact type; a subclass is not taken for its
base (it would come back as another type), so it is left to pickle or
refused. Decoding builds values only from the fixed tables and constructors
named here, never from a name in the file: a hostile checkpoint cannot make
a load import or call anything it names.
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import decimal
import enum
import fractions
import json
import pathlib
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DECODERS", "DICT_FACTORIES", "Context", "Malformed", "encode_kind"]

Nested = Callable[[Any], Any]
"""Encodes (or decodes) one value nested inside another one's payload."""

# A value's metadata entry is not the place for bulk data: bigger arrays
# belong in a tensor, which is checksummed and read in parallel.
MAX_NDARRAY_BYTES = 64 << 10
# Fraction() reduces by gcd, quadratic in the digits: keep a file's cost small.
_MAX_FRACTION_BITS = 1 << 16

_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_DEVICE = re.compile(r"[a-z][a-z0-9_]{0,31}(:[0-9]{1,6})?")
_PATHS = {
    c.__name__: c
    for c in (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath)
}
_PURE: dict[type[pathlib.PurePath], type[pathlib.PurePath]] = {
    pathlib.PosixPath: pathlib.PurePosixPath,
    pathlib.WindowsPath: pathlib.PureWindowsPath,
}
_NP_DTYPE = re.compile(r"[<>|][biufcmMSU][0-9]{1,6}(\[[0-9]{0,6}[a-zA-Z]{1,3}\])?")
_NP_KINDS = frozenset("biufcmMSU")
_UUID = re.compile(r"[0-9a-f]{32}")


class Malformed(ValueError):
    """A payload that does not have the form its tag requires."""


@dataclass(frozen=True, slots=True)
class Context:
    """What a decoder may use besides its payload."""

    nested: Nested
    like: Any
    """The load target's current value (to restore an enum member into), or None."""


def encode_kind(value: object, nested: Nested) -> Any:
    """The tagged encoding of ``value``, or None when no kind here takes it.

    Raises TypeError (without the key; the caller adds it) for a value of a
    supported kind that would not round-trip.
    """
    t = type(value)
    encoder = _ENCODERS.get(t)
    if encoder is not None:
        return encoder(value, nested)
    if isinstance(value, enum.Enum):
        return _encode_enum(value, nested)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.generic, np.ndarray)):
        return _encode_numpy(value, np)
    if isinstance(value, pathlib.PurePath):
        raise TypeError(f"{t.__qualname__} is a subclass of pathlib's paths and would load as its base class")
    return None


def _encode_datetime(value: Any, nested: Nested) -> Any:
    if value.tzinfo is not None and type(value.tzinfo) is not datetime.timezone:
        raise TypeError(
            f"its time zone {value.tzinfo!r} is not a fixed offset; convert it with .astimezone(datetime.UTC)"
        )
    return {"$datetime": value.isoformat()}


def _encode_fraction(value: Any, nested: Nested) -> Any:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > _MAX_FRACTION_BITS:
        raise TypeError(f"fractions of more than {_MAX_FRACTION_BITS} bits are not supported")
    return {"$fraction": [nested(value.numerator), nested(value.denominator)]}


def _encode_set(tag: str) -> Callable[[Any, Nested], Any]:
    def encode(value: Any, nested: Nested) -> Any:
        # Sorted by the encoding, so that equal sets encode alike on every rank
        # (str hashing, and so iteration order, differs between processes).
        return {tag: sorted((nested(v) for v in value), key=lambda e: json.dumps(e, sort_keys=True))}

    return encode


def _encode_namespace(value: Any, nested: Nested) -> Any:
    return {"$namespace": {k: nested(v) for k, v in vars(value).items()}}


def _encode_enum(value: enum.Enum, nested: Nested) -> Any:
    cls = type(value)
    return {
        "$enum": {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "name": value.name,
            "value": nested(value.value),
        }
    }


def _encode_numpy(value: Any, np: Any) -> Any:
    dtype = value.dtype
    if dtype.kind not in _NP_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"numpy dtype {dtype} is not supported (numbers, bools, dates and strings are)")
    if isinstance(value, np.generic):
        return {"$numpy": [dtype.str, _b64e(value.tobytes())]}
    if type(value) is not np.ndarray:
        raise TypeError(
            f"{type(value).__qualname__} is a subclass of numpy.ndarray and would load as its base class"
        )
    if value.nbytes > MAX_NDARRAY_BYTES:
        raise TypeError(
            f"a numpy array of {value.nbytes} bytes is too large for a value (at most {MAX_NDARRAY_BYTES}); "
            "inside a plain value; hold it directly in a dict (where a numeric array is saved as a tensor)"
        )
    return {"$ndarray": [dtype.str, list(value.shape), _b64e(np.ascontiguousarray(value).tobytes())]}


# A fixed table, looked up by name: a defaultdict factory is never imported from a file.
DICT_FACTORIES: dict[str, type] = {t.__name__: t for t in (list, dict, set, int, float, str, tuple)}


def _pairs(value: Any, nested: Nested) -> list[list[Any]]:
    return [[nested(k), nested(v)] for k, v in value.items()]


def _encode_defaultdict(value: Any, nested: Nested) -> Any:
    # Only a builtin factory is kept, by name; any other loads as None (never imported).
    factory = value.default_factory
    name = getattr(factory, "__name__", None)
    kept = name if factory is not None and DICT_FACTORIES.get(name or "") is factory else None
    return {"$defaultdict": [kept, _pairs(value, nested)]}


_ENCODERS: dict[type, Callable[[Any, Nested], Any]] = {
    collections.OrderedDict: lambda v, n: {"$ordereddict": _pairs(v, n)},
    collections.defaultdict: _encode_defaultdict,
    torch.dtype: lambda v, n: {"$dtype": str(v).removeprefix("torch.")},
    torch.device: lambda v, n: {"$device": str(v)},
    **{c: (lambda v, n: {"$path": [type(v).__name__, str(v)]}) for c in _PATHS.values()},
    datetime.datetime: _encode_datetime,
    datetime.date: lambda v, n: {"$date": v.isoformat()},
    datetime.timedelta: lambda v, n: {"$timedelta": [v.days, v.seconds, v.microseconds]},
    decimal.Decimal: lambda v, n: {"$decimal": str(v)},
    fractions.Fraction: _encode_fraction,
    uuid.UUID: lambda v, n: {"$uuid": v.hex},
    set: _encode_set("$set"),
    frozenset: _encode_set("$frozenset"),
    argparse.Namespace: _encode_namespace,
}


# ------------------------------------------------------------------ decoding


def _str(payload: object, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(payload, str) or (pattern is not None and not pattern.fullmatch(payload)):
        raise Malformed("bad payload")
    return payload


def _list(payload: object, n: int | None = None) -> list[Any]:
    if not isinstance(payload, list) or (n is not None and len(payload) != n):
        raise Malformed("bad payload")
    return payload


def _int(value: object) -> int:
    if type(value) is not int:
        raise Malformed("expected an integer")
    return value


def _decode_dtype(payload: object, ctx: Context) -> torch.dtype:
    dtype = _DTYPES.get(_str(payload))
    if dtype is None:
        raise Malformed(f"unknown torch dtype {str(payload)[:40]!r}")
    return dtype


def _decode_path(payload: object, ctx: Context) -> pathlib.PurePath:
    name, text = _list(payload, 2)
    cls = _PATHS.get(_str(name))
    if cls is None:
        raise Malformed(f"unknown path class {str(name)[:40]!r}")
    try:
        return cls(_str(text))
    except NotImplementedError:  # a WindowsPath on POSIX, or the reverse: its pure flavour
        return _PURE[cls](text)


def _decode_datetime(payload: object, ctx: Context) -> datetime.datetime:
    return datetime.datetime.fromisoformat(_str(payload))


def _decode_timedelta(payload: object, ctx: Context) -> datetime.timedelta:
    days, seconds, micros = (_int(v) for v in _list(payload, 3))
    return datetime.timedelta(days=days, seconds=seconds, microseconds=micros)


def _decode_decimal(payload: object, ctx: Context) -> decimal.Decimal:
    value = decimal.Decimal(_str(payload))
    if str(value) != payload:  # only the form str() writes: no spaces, underscores or case variants
        raise Malformed("not a canonical decimal")
    return value


def _decode_fraction(payload: object, ctx: Context) -> fractions.Fraction:
    num, den = (_int(ctx.nested(v)) for v in _list(payload, 2))
    if den <= 0 or max(num.bit_length(), den.bit_length()) > _MAX_FRACTION_BITS:
        raise Malformed("bad fraction")
    return fractions.Fraction(num, den)


def _decode_set(payload: object, ctx: Context) -> set[Any]:
    return {ctx.nested(v) for v in _list(payload)}


def _decode_pairs(payload: object, ctx: Context) -> Iterator[tuple[Any, Any]]:
    for pair in _list(payload):
        if not isinstance(pair, list) or len(pair) != 2:
            raise Malformed("bad key/value pair")
        yield ctx.nested(pair[0]), ctx.nested(pair[1])


def _decode_defaultdict(payload: object, ctx: Context) -> collections.defaultdict[Any, Any]:
    items = _list(payload)
    if len(items) != 2 or not (items[0] is None or items[0] in DICT_FACTORIES):
        raise Malformed("bad defaultdict")
    return collections.defaultdict(DICT_FACTORIES.get(items[0]), _decode_pairs(items[1], ctx))


def _decode_namespace(payload: object, ctx: Context) -> argparse.Namespace:
    if not isinstance(payload, dict) or any(k.startswith("__") for k in payload):
        raise Malformed("bad namespace")
    return argparse.Namespace(**{k: ctx.nested(v) for k, v in payload.items()})


def _decode_enum(payload: object, ctx: Context) -> Any:
    if not isinstance(payload, dict) or payload.keys() != {"class", "name", "value"}:
        raise Malformed("bad enum")
    cls_name, name = _str(payload["class"]), payload["name"]
    if name is not None:
        _str(name)
    raw = ctx.nested(payload["value"])
    cls = type(ctx.like)
    # The class is only compared by name with the target's own, never looked up.
    if not isinstance(ctx.like, enum.Enum) or f"{cls.__module__}.{cls.__qualname__}" != cls_name:
        return raw
    member = cls.__members__.get(name) if name is not None else None
    if member is not None:
        return member
    try:
        return cls(raw)
    except (ValueError, TypeError):
        return raw


def _np_dtype(text: object) -> Any:
    import numpy as np

    dtype = np.dtype(_str(text, _NP_DTYPE))
    if dtype.str != text or dtype.kind not in _NP_KINDS:
        raise Malformed(f"unsupported numpy dtype {text!r}")
    return np, dtype


def _decode_numpy(payload: object, ctx: Context) -> Any:
    dtype_text, data = _list(payload, 2)
    np, dtype = _np_dtype(dtype_text)
    raw = _b64d(data)
    if len(raw) != dtype.itemsize:
        raise Malformed("wrong byte count")
    return np.frombuffer(raw, dtype)[0]


def _decode_ndarray(payload: object, ctx: Context) -> Any:
    dtype_text, shape, data = _list(payload, 3)
    np, dtype = _np_dtype(dtype_text)
    dims = [_int(d) for d in _list(shape)]
    raw = _b64d(data)
    count = 1
    for d in dims:
        if d < 0:
            raise Malformed("negative dimension")
        count *= d
    if len(dims) > 32 or count * dtype.itemsize != len(raw):
        raise Malformed("shape does not match the bytes")
    return np.frombuffer(raw, dtype).reshape(dims).copy()


DECODERS: dict[str, Callable[[Any, Context], Any]] = {
    "$dtype": _decode_dtype,
    "$device": lambda p, c: torch.device(_str(p, _DEVICE)),
    "$path": _decode_path,
    "$datetime": _decode_datetime,
    "$date": lambda p, c: datetime.date.fromisoformat(_str(p)),
    "$timedelta": _decode_timedelta,
    "$decimal": _decode_decimal,
    "$fraction": _decode_fraction,
    "$uuid": lambda p, c: uuid.UUID(hex=_str(p, _UUID)),
    "$set": _decode_set,
    "$frozenset": lambda p, c: frozenset(_decode_set(p, c)),
    "$namespace": _decode_namespace,
    "$ordereddict": lambda p, c: collections.OrderedDict(_decode_pairs(p, c)),
    "$defaultdict": _decode_defaultdict,
    "$enum": _decode_enum,
    "$numpy": _decode_numpy,
    "$ndarray": _decode_ndarray,
}


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(payload: object) -> bytes:
    try:
        return base64.b64decode(_str(payload).encode("ascii"), validate=True)
    except UnicodeEncodeError as exc:
        raise Malformed("invalid base64") from exc
