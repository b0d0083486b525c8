"""numpy arrays of any numeric or bool dtype are stored as tensors in the shards (issue 12 section 2).

Checked through real checkpoints on disk, without pickle: into a target ndarray
(filled in place), into targets that hold something else, through
``AsyncCheckpointer`` and without a target (``load_state_dict``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import async_ckpt as ac
from async_ckpt.format.metadata import METADATA_FILE, decode_metadata


def _state() -> dict[str, Any]:
    big = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: over the 64 KiB a JSON value may hold
    flags = np.array([True, False, True, True])
    grid = np.arange(40, dtype=np.int64).reshape(5, 8)[:, ::2]  # 2-D, not contiguous
    return {
        "big": big,
        "flags": flags,
        "grid": grid,
        "u16": np.arange(5, dtype=np.uint16),
        "t": torch.ones(2),
    }


def _check(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in ("big", "flags", "grid", "u16"):
        assert type(got[key]) is np.ndarray, key
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert np.array_equal(got[key], want[key]), key
    assert torch.equal(got["t"], torch.ones(2))


@pytest.fixture(scope="module")
def ck() -> Iterator[ac.AsyncCheckpointer]:
    with ac.AsyncCheckpointer(start=True, timeout=60) as c:
        yield c


def test_numpy_arrays_are_stored_as_tensors_and_marked_numpy_in_the_tree(tmp_path: Path) -> None:
    ac.save(_state(), tmp_path / "c", allow_pickle=False)
    md = decode_metadata((tmp_path / "c" / METADATA_FILE).read_bytes(), where="c")
    assert {"big", "flags", "grid", "u16", "t"} <= set(md.tensors) and not set(md.values) & {"big", "grid"}
    nodes = dict(md.tree["d"])
    assert nodes["big"] == {"x": "big", "np": 1} and nodes["t"] == {"x": "t"}


def test_numpy_arrays_come_back_as_ndarrays_from_load_state_dict(tmp_path: Path) -> None:
    ac.save(_state(), tmp_path / "c", allow_pickle=False)
    _check(ac.load_state_dict(tmp_path / "c", allow_pickle=False), _state())


def test_numpy_arrays_through_async_checkpointer(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    for step in range(2):  # the second save reuses the cached layout
        state = _state()
        state["big"] += step
        ck.save(state, tmp_path / f"c{step}").result(timeout=120)
        _check(ac.load_state_dict(tmp_path / f"c{step}", allow_pickle=False), state)


def test_target_ndarray_of_same_shape_and_dtype_is_filled_in_place(tmp_path: Path) -> None:
    ac.save(_state(), tmp_path / "c", allow_pickle=False)
    target = {
        k: np.zeros_like(v) if isinstance(v, np.ndarray) else torch.zeros(2) for k, v in _state().items()
    }
    before = {k: v for k, v in target.items() if isinstance(v, np.ndarray)}
    ac.load(target, tmp_path / "c", allow_pickle=False)
    _check(target, _state())
    assert all(target[k] is arr for k, arr in before.items())


def test_target_holding_none_another_value_or_another_array_gets_the_loaded_ndarray(tmp_path: Path) -> None:
    ac.save(_state(), tmp_path / "c", allow_pickle=False)
    target: dict[str, Any] = {
        "big": None,
        "flags": 3,
        "grid": np.zeros((2, 2)),
        "u16": "x",
        "t": torch.zeros(2),
    }
    ac.load(target, tmp_path / "c", allow_pickle=False)
    _check(target, _state())


def test_target_tensor_where_an_ndarray_was_saved_gets_a_tensor(tmp_path: Path) -> None:
    ac.save(_state(), tmp_path / "c", allow_pickle=False)
    dest = torch.zeros(1 << 18)
    target = {"big": dest}
    ac.load(target, tmp_path / "c", allow_pickle=False, strict=False)
    assert target["big"] is dest and torch.equal(dest, torch.arange(1 << 18, dtype=torch.float32))


def test_target_ndarray_where_a_tensor_was_saved_gets_an_ndarray(tmp_path: Path) -> None:
    ac.save({"t": torch.arange(4)}, tmp_path / "c", allow_pickle=False)
    target: dict[str, Any] = {"t": np.zeros(4, dtype=np.int64)}
    arr = target["t"]
    ac.load(target, tmp_path / "c", allow_pickle=False)
    assert target["t"] is arr and np.array_equal(arr, np.arange(4))


def test_failed_load_leaves_a_target_ndarray_untouched(tmp_path: Path) -> None:
    ac.save(_state(), tmp_path / "c", allow_pickle=False)
    target: dict[str, Any] = {"big": np.zeros(1 << 18, dtype=np.float32), "absent": torch.zeros(1)}
    with pytest.raises(ac.CheckpointError, match="absent"):
        ac.load(target, tmp_path / "c", allow_pickle=False)
    assert not target["big"].any()


def test_missing_ndarray_in_a_stateful_is_rebuilt_as_an_ndarray(tmp_path: Path) -> None:
    holder = _Holder({})
    ac.save({"s": _Holder({"arr": np.arange(6.0).reshape(2, 3)})}, tmp_path / "c", allow_pickle=False)
    ac.load({"s": holder}, tmp_path / "c", allow_pickle=False)
    assert type(holder.sd["arr"]) is np.ndarray and np.array_equal(
        holder.sd["arr"], np.arange(6.0).reshape(2, 3)
    )


class _Holder:
    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self.sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.sd = sd


def test_load_state_dict_restores_ndarrays_and_convert_writes_them_as_tensors(tmp_path: Path) -> None:
    from async_ckpt.cli import main

    ac.save(_state(), tmp_path / "c", allow_pickle=False)
    assert main(["convert", str(tmp_path / "c"), "--to", "torch", str(tmp_path / "out.pt")]) == 0
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(state["big"], torch.arange(1 << 18, dtype=torch.float32))
    assert state["grid"].dtype == torch.int64 and state["grid"].shape == (5, 4)


def test_small_arrays_inside_plain_lists_stay_json_values(tmp_path: Path) -> None:
    ac.save({"v": [np.arange(3), 1]}, tmp_path / "c", allow_pickle=False)
    got = ac.load_state_dict(tmp_path / "c", allow_pickle=False)
    assert type(got["v"][0]) is np.ndarray and np.array_equal(got["v"][0], np.arange(3))
