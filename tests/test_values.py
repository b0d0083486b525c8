"""Non-tensor values: every supported kind round-trips to the same type, without pickle.

Encodings are checked both directly (``encode_value``/``decode_value``) and
through real checkpoints on disk; hostile encodings must be refused as
corruption without importing or calling anything.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import decimal
import enum
import fractions
import json
import math
import os
import pickle
import random
import sys
import uuid
import zoneinfo
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pytest
import torch

import async_ckpt as ac
from async_ckpt.errors import CorruptCheckpointError
from async_ckpt.format.metadata import METADATA_FILE, ValueRecord, encode_metadata
from async_ckpt.format.values import decode_value, encode_value


def _round_trip(value: object) -> Any:
    """Through JSON text, as the value goes through metadata.json."""
    enc = json.loads(json.dumps(encode_value(value, fqn="k", allow_pickle=False)))
    return decode_value(enc, fqn="k", allow_pickle=False)


@pytest.fixture
def low_int_digits() -> Iterator[None]:
    """The lowest limit Python allows on int <-> decimal conversions."""
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(old)


# ------------------------------------------------------------------ big ints


BIG = [10**5000, -(7**9000) + 3, 2**2048, -(2**2048), 2**2048 - 1, 12345678901234567890]


@pytest.mark.parametrize("n", BIG, ids=["1e5000", "neg-7^9000", "2^2048", "-2^2048", "2^2048-1", "u64+"])
def test_int_of_any_size_round_trips(n: int) -> None:
    back = _round_trip(n)
    assert type(back) is int and back == n


def test_huge_ints_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    sd = {"n": 10**5000, "neg": -(3**20000), "small": 7, "t": torch.ones(2)}
    ac.save(sd, ck)
    target: dict[str, Any] = {"n": 0, "neg": 0, "small": 0, "t": torch.zeros(2)}
    ac.load(target, ck)
    assert target["n"] == sd["n"] and target["neg"] == sd["neg"] and target["small"] == 7


def test_huge_ints_decode_under_the_lowest_int_digit_limit(tmp_path: Path, low_int_digits: None) -> None:
    ck = tmp_path / "c"
    ac.save({"n": 10**700 + 1}, ck)  # 701 digits: over the limit in effect
    target: dict[str, Any] = {"n": 0}
    ac.load(target, ck)
    assert target["n"] == 10**700 + 1


@pytest.mark.parametrize(
    "payload", ["", "-", "0x1f", " 1f", "1_f", "+1f", "1F", "00ff", "-0", "g", 5, None, ["1"]]
)
def test_malformed_big_int_payload_is_corruption(payload: object) -> None:
    with pytest.raises(CorruptCheckpointError, match="'k'"):
        decode_value({"$int": payload}, fqn="k", allow_pickle=False)


def test_huge_hostile_int_payload_decodes_in_one_pass() -> None:
    """8 M hex digits (32 Mbit): hex is a power-of-two base, so conversion is linear, never quadratic."""
    digits = "f" * (8 << 20)
    assert decode_value({"$int": digits}, fqn="k", allow_pickle=False).bit_length() == 4 * len(digits)


# ------------------------------------------------------------------ pickle failures


def test_unpicklable_value_with_allow_pickle_names_the_key(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    with pytest.raises(TypeError, match=r"'cfg\.hook'") as info:
        ac.save({"cfg": {"hook": lambda x: x}, "t": torch.ones(1)}, ck, allow_pickle=True)
    assert isinstance(info.value.__cause__, (pickle.PicklingError, AttributeError, TypeError))
    assert not ck.exists()


# ------------------------------------------------------------------ torch.Size


def test_torch_size_encodes_and_decodes_as_torch_size() -> None:
    for size in (torch.Size([2, 3]), torch.Size([]), torch.Size([0, 1 << 40])):
        back = _round_trip(size)
        assert type(back) is torch.Size and back == size


def test_torch_size_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    """flatten keeps a torch.Size whole (a leaf value), though it is a tuple."""
    ck = tmp_path / "c"
    ac.save(
        {"shape": torch.Size([2, 3]), "shapes": [torch.Size([4]), torch.Size([])], "t": torch.ones(1)}, ck
    )
    assert ac.read_metadata(ck).values["shape"].value == {"$size": [2, 3]}
    target: dict[str, Any] = {"shape": None, "shapes": None, "t": torch.zeros(1)}
    ac.load(target, ck)
    assert type(target["shape"]) is torch.Size and target["shape"] == (2, 3)
    assert [type(s) for s in target["shapes"]] == [torch.Size, torch.Size]
    assert target["shapes"] == [torch.Size([4]), torch.Size([])]


@pytest.mark.parametrize("payload", [[1.5], ["2"], [-1], [True], "3", None, {"a": 1}])
def test_malformed_torch_size_is_corruption(payload: object) -> None:
    with pytest.raises(CorruptCheckpointError, match="'k'"):
        decode_value({"$size": payload}, fqn="k", allow_pickle=False)


# ------------------------------------------------------------------ safe encodings of common types


class Color(enum.Enum):
    RED = "r"
    BLUE = "b"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(enum.StrEnum):
    TRAIN = "train"
    EVAL = "eval"


class Perm(enum.Flag):
    R = 4
    W = 2


SAME_TYPE: dict[str, object] = {
    "dtype": torch.bfloat16,
    "dtype_f8": torch.float8_e4m3fn,
    "device_cpu": torch.device("cpu"),
    "device_cuda1": torch.device("cuda", 1),
    "pure_posix": PurePosixPath("a/b c/d.txt"),
    "pure_windows": PureWindowsPath(r"C:\runs\x"),
    "path": Path("/tmp/run/step-1"),
    "datetime_naive": datetime.datetime(2024, 2, 29, 23, 59, 58, 123456),
    "datetime_utc": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    "datetime_offset": datetime.datetime(
        2024, 1, 2, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    ),
    "date": datetime.date(1999, 12, 31),
    "timedelta": datetime.timedelta(days=-3, seconds=5, microseconds=7),
    "decimal": decimal.Decimal("1.10"),
    "decimal_neg_zero": decimal.Decimal("-0"),
    "decimal_inf": decimal.Decimal("-Infinity"),
    "decimal_exp": decimal.Decimal("1.5E+400"),
    "fraction": fractions.Fraction(-3, 7),
    "fraction_big": fractions.Fraction(2**5000 + 1, 3),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "namespace": argparse.Namespace(lr=0.1, layers=[1, 2], name=None, inner=argparse.Namespace(x=b"\x00")),
    "set": {1, "a", (1, 2), None, 2.5},
    "set_empty": set(),
    "frozenset": frozenset({"x", "y", frozenset({1})}),
    "np_float32": np.float32(1.1),
    "np_float64": np.float64(-2.5),
    "np_float16": np.float16(0.1),
    "np_int64": np.int64(-(2**62)),
    "np_uint8": np.uint8(255),
    "np_bool": np.bool_(True),
    "np_complex64": np.complex64(1 + 2j),
    "np_datetime64": np.datetime64("2024-01-01T00:00:00"),
    "np_timedelta64": np.timedelta64(5, "ms"),
    "np_str": np.str_("héllo"),
    "np_bytes": np.bytes_(b"ab"),
    "list": [1, (2, "x"), {"k": b"v", 3: [None]}, torch.float16],
    "tuple": (1, [2.5, float("inf")], ()),
    "dict": {"a": 1, 2: {"b": (3,)}, None: set(), (1, "t"): "tuple key", "$float": "not a tag"},
}


def _same(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)  # type: ignore[union-attr]
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[call-overload]
    if isinstance(a, argparse.Namespace):
        return _same(vars(a), vars(b))
    if isinstance(a, float) and math.isinf(a):
        return a == b
    return a == b


@pytest.mark.parametrize("name", list(SAME_TYPE))
def test_value_round_trips_to_the_same_type(name: str) -> None:
    value = SAME_TYPE[name]
    back = _round_trip(value)
    assert _same(back, value), f"{value!r} came back as {back!r}"


def test_small_ndarray_value_round_trips() -> None:
    for arr in (
        np.arange(624, dtype=">u4"),
        np.zeros((2, 0, 3), dtype=np.float16),
        np.array([[1 + 2j]], dtype=np.complex128),
        np.asfortranarray(np.arange(6, dtype=np.int8).reshape(2, 3)),
    ):
        back = _round_trip(arr)
        assert _same(back, np.ascontiguousarray(arr)) and back.flags.writeable


def test_large_ndarray_value_is_refused_naming_the_key() -> None:
    with pytest.raises(TypeError, match=r"'k'.*tensor"):
        encode_value(np.zeros(1 << 20), fqn="k", allow_pickle=False)


def test_equal_sets_encode_identically_whatever_their_order() -> None:
    """Ranks compare encodings to tell replicated values from per-rank ones."""
    a = {f"s{i}" for i in range(50)}
    b = set(sorted(a, reverse=True))
    assert json.dumps(encode_value(a, fqn="k", allow_pickle=False)) == json.dumps(
        encode_value(b, fqn="k", allow_pickle=False)
    )


@pytest.mark.parametrize(
    "bad",
    [
        datetime.datetime(2024, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
        PurePosixPathChild := type("PurePosixPathChild", (PurePosixPath,), {})("x"),
        np.array([object()]),
        type("DictChild", (dict,), {})(a=1),
        decimal.Context(),
        fractions.Fraction(2**70000, 3),
    ],
    ids=["zoneinfo", "path_subclass", "object_ndarray", "dict_subclass", "decimal_context", "fraction_huge"],
)
def test_kinds_that_would_not_round_trip_are_refused_naming_the_key(bad: object) -> None:
    with pytest.raises(TypeError, match="'k'"):
        encode_value(bad, fqn="k", allow_pickle=False)


def test_enum_member_restored_when_the_target_holds_the_same_enum(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    sd = {
        "color": Color.RED,
        "level": Level.HIGH,
        "mode": Mode.EVAL,
        "perm": Perm.R | Perm.W,
        "other": Color.BLUE,
    }
    ac.save(sd, ck)
    target: dict[str, Any] = {
        "color": Color.BLUE,
        "level": Level.LOW,
        "mode": Mode.TRAIN,
        "perm": Perm.R,
        "other": "not an enum",
    }
    ac.load(target, ck)
    assert target["color"] is Color.RED and target["level"] is Level.HIGH and target["mode"] is Mode.EVAL
    assert target["perm"] == Perm.R | Perm.W and type(target["perm"]) is Perm
    assert target["other"] == "b" and type(target["other"]) is str  # no enum in the target: the raw value


def test_enum_without_a_matching_target_decodes_to_its_raw_value() -> None:
    for member, raw in ((Color.RED, "r"), (Level.HIGH, 2), (Mode.EVAL, "eval")):
        back = _round_trip(member)
        assert back == raw and type(back) is type(raw)
    enc = json.loads(json.dumps(encode_value(Color.RED, fqn="k", allow_pickle=False)))

    class Color2(enum.Enum):  # same members, another class: not restored
        RED = "r"

    assert decode_value(enc, fqn="k", allow_pickle=False, like=Color2.RED) == "r"
    assert decode_value(enc, fqn="k", allow_pickle=False, like=Color.BLUE) is Color.RED


def test_every_kind_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    # Containers at the top of a state dict are flattened (section 5), not values: left out.
    sd = {"v": {k: v for k, v in SAME_TYPE.items() if type(v) not in (list, tuple, dict)}, "t": torch.ones(2)}
    ac.save(sd, ck)
    assert not ac.read_metadata(ck).pickled
    target: dict[str, Any] = {"v": dict.fromkeys(sd["v"]), "t": torch.zeros(2)}
    ac.load(target, ck)
    for name, value in sd["v"].items():
        assert _same(target["v"][name], value), f"{name}: {value!r} came back as {target['v'][name]!r}"


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    pcg = np.random.default_rng(3)
    mt = np.random.Generator(np.random.MT19937(4))
    sd = {
        "python": random.getstate(),
        "numpy_legacy": np.random.get_state(),
        "pcg64": pcg.bit_generator.state,
        "mt19937": mt.bit_generator.state,
    }
    want = (random.random(), np.random.random(), pcg.random(), mt.random())
    ck = tmp_path / "c"
    ac.save(sd, ck)
    random.seed(9)
    np.random.seed(9)
    pcg, mt = np.random.default_rng(9), np.random.Generator(np.random.MT19937(9))
    target: dict[str, Any] = {
        "python": random.getstate(),
        "numpy_legacy": np.random.get_state(),
        "pcg64": pcg.bit_generator.state,
        "mt19937": mt.bit_generator.state,
    }
    ac.load(target, ck)
    random.setstate(target["python"])
    np.random.set_state(target["numpy_legacy"])
    pcg.bit_generator.state = target["pcg64"]
    mt.bit_generator.state = target["mt19937"]
    assert (random.random(), np.random.random(), pcg.random(), mt.random()) == want


# ------------------------------------------------------------------ hostile encodings


HOSTILE = [
    {"$enum": {"class": "os.system", "name": "x", "value": {"$path": ["os.system", "echo"]}}},
    {"$path": ["subprocess.Popen", "echo hi"]},
    {"$path": ["__import__", "os"]},
    {"$dtype": "load"},
    {"$dtype": "_dynamo"},
    {"$device": "cuda;__import__('os')"},
    {"$numpy": ["|O8", "AAAAAAAAAAA="]},
    {"$numpy": ["<f8", "AAAA"]},
    {"$ndarray": ["|O8", [1], "AAAAAAAAAAA="]},
    {"$ndarray": ["<f4", [3], "AAAAAAAAAAA="]},
    {"$ndarray": ["<f4", [-1], ""]},
    {"$namespace": {"__class__": {"$path": ["PosixPath", "x"]}}},
    {"$namespace": {"__dict__": {"$dict": [["a", 1]]}}},
    {"$set": [[1], [2]]},
    {"$decimal": "1_000"},
    {"$decimal": " 1"},
    {"$fraction": [1, 0]},
    {"$fraction": [{"$int": "f" * 20000}, 3]},
    {"$uuid": "not-a-uuid"},
    {"$datetime": "2024-13-01T00:00:00"},
    {"$date": "yesterday"},
    {"$timedelta": [10**12, 0, 0]},
    {"$timedelta": [1, "2", 3]},
    {"$dict": [[[1], 2]]},
    {"$tuple": "abc"},
    {"$size": [1, -2]},
    {"$pickle": base64.b64encode(pickle.dumps(os.getcwd)).decode()},
]

_WATCHED = {"import", "exec", "compile", "open", "os.system", "subprocess.Popen", "pickle.find_class"}
_events: list[str] = []
_watching = [False]


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watching[0] and (event in _WATCHED or event.startswith(("os.", "ctypes.", "subprocess."))):
        _events.append(event)


sys.addaudithook(_audit)  # cannot be removed; it records only while a test watches


@pytest.mark.parametrize("encoded", HOSTILE, ids=[next(iter(h)) + str(i) for i, h in enumerate(HOSTILE)])
def test_hostile_value_encoding_imports_and_calls_nothing(encoded: dict[str, Any]) -> None:
    targets = [None, Color.RED, argparse.Namespace()]
    _events.clear()
    _watching[0] = True
    try:
        for like in targets:
            try:
                got = decode_value(encoded, fqn="k", allow_pickle=False, like=like)
            except ac.CheckpointError as exc:
                assert "'k'" in str(exc)
            else:
                assert not callable(got) and type(got).__module__ in ("builtins",), got
    finally:
        _watching[0] = False
    assert _events == []


def test_loading_a_checkpoint_with_hostile_values_imports_and_calls_nothing(tmp_path: Path) -> None:
    """End to end: each hostile encoding in turn in a real checkpoint's metadata.json, loaded into
    targets of several kinds (enum, Namespace, path); the load fails as corruption or yields plain data."""
    ck = tmp_path / "c"
    ac.save({"v": 1, "t": torch.ones(1)}, ck)
    md = ac.read_metadata(ck)
    ac.load({"v": Color.RED, "t": torch.zeros(1)}, ck)  # warm up: lazy imports of the load path itself
    for like in (Color.BLUE, argparse.Namespace(), PurePosixPath("x")):
        for encoded in HOSTILE:
            hostile = dataclasses.replace(md, values={"v": ValueRecord(value=encoded)})
            (ck / METADATA_FILE).write_bytes(encode_metadata(hostile))
            target: dict[str, Any] = {"v": like, "t": torch.zeros(1)}
            _events.clear()
            _watching[0] = True
            try:
                ac.load(target, ck)
            except ac.CheckpointError as exc:
                assert "'v'" in str(exc), exc
            else:
                assert type(target["v"]).__module__ == "builtins" and not callable(target["v"])
            finally:
                _watching[0] = False
            # The load opens its own files, and formatting an error's traceback compiles
            # source lines of async_ckpt (ast.parse): neither comes from the checkpoint.
            assert [e for e in _events if e not in ("open", "compile")] == [], encoded
