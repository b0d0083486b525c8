"""Non-tensor values: every supported kind round-trips to the same type, without pickle.

Encodings are checked both directly (``encode_value``/``decode_value``) and
through real checkpoints on disk; hostile encodings must be refused as
corruption without importing or calling anything.
"""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt as ac
from async_ckpt.errors import CorruptCheckpointError
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


@pytest.mark.parametrize("payload", [[1.5], ["2"], [-1], [True], "3", None, {"a": 1}])
def test_malformed_torch_size_is_corruption(payload: object) -> None:
    with pytest.raises(CorruptCheckpointError, match="'k'"):
        decode_value({"$size": payload}, fqn="k", allow_pickle=False)
