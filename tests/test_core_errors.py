"""Single-process error paths: strict keys, mismatches, unsupported values, pickle, storage ids.

Real checkpoints under ``tmp_path``; the only fakes are the pickle/torch.load
traps that prove loading never unpickles.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from torch import nn

import async_ckpt as ac
from async_ckpt.testing import assert_bits_equal


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []


# ---------------------------------------------------------------- strict


def test_missing_key_raises_naming_it(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    ac.save({"a": torch.ones(2), "nested": {"b": torch.ones(3)}}, ck)
    target = {"a": torch.zeros(2), "nested": {"b": torch.zeros(3), "extra": torch.zeros(1)}}
    with pytest.raises(ac.CheckpointError, match=r"nested\.extra") as info:
        ac.load(target, ck)
    assert str(ck) in str(info.value)
    # A failed load leaves the target's structure as it was.
    assert set(target) == {"a", "nested"}
    assert set(target["nested"]) == {"b", "extra"}
    assert torch.equal(target["nested"]["extra"], torch.zeros(1))


def test_missing_non_tensor_key_raises(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    ac.save({"a": torch.ones(2)}, ck)
    with pytest.raises(ac.CheckpointError, match="step"):
        ac.load({"a": torch.zeros(2), "step": 5}, ck)


def test_failed_load_keeps_tuples_as_tuples(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    ac.save({"t": (torch.ones(2), 1)}, ck)
    target: dict[str, Any] = {"t": (torch.zeros(2), 0), "missing": torch.zeros(1)}
    with pytest.raises(ac.CheckpointError, match="missing"):
        ac.load(target, ck)
    assert type(target["t"]) is tuple
    assert isinstance(target["t"][0], torch.Tensor)


def test_strict_false_leaves_missing_keys_untouched(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    saved = {"a": torch.randn(4), "v": 3}
    ac.save(saved, ck)
    keep = torch.full((2,), 7.0)
    with torch.device("meta"):
        meta_keep = torch.empty(3)
    target: dict[str, Any] = {"a": torch.zeros(4), "v": 0, "new": keep, "new_val": "x", "meta": meta_keep}
    ac.load(target, ck, strict=False)
    assert torch.equal(target["a"], saved["a"])
    assert target["v"] == 3
    assert target["new"] is keep and torch.equal(keep, torch.full((2,), 7.0))
    assert target["new_val"] == "x"
    assert target["meta"] is meta_keep


def test_extra_checkpoint_keys_are_fine(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    saved = {"a": torch.randn(4), "b": torch.randn(2), "v": {"x": 1, "y": [1, 2]}}
    ac.save(saved, ck)
    target = {"a": torch.zeros(4)}
    ac.load(target, ck)
    assert set(target) == {"a"}
    assert torch.equal(target["a"], saved["a"])


def test_strict_applies_inside_modules(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    ac.save({"m": nn.Linear(3, 2, bias=False)}, ck)
    with pytest.raises(ac.CheckpointError, match=r"m\.bias"):
        ac.load({"m": nn.Linear(3, 2)}, ck)


# ---------------------------------------------------------------- mismatches


def test_shape_mismatch_names_key_and_both_shapes(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    ac.save({"model": {"w": torch.ones(2, 3)}}, ck)
    target = {"model": {"w": torch.zeros(3, 2)}}
    with pytest.raises(ac.CheckpointError) as info:
        ac.load(target, ck)
    msg = str(info.value)
    assert "model.w" in msg
    assert "(3, 2)" in msg and "(2, 3)" in msg
    assert str(ck) in msg
    assert torch.equal(target["model"]["w"], torch.zeros(3, 2))


def test_dtype_mismatch_names_key_and_both_dtypes(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    ac.save({"w": torch.ones(4, dtype=torch.float32)}, ck)
    with pytest.raises(ac.CheckpointError) as info:
        ac.load({"w": torch.zeros(4, dtype=torch.bfloat16)}, ck)
    msg = str(info.value)
    assert "'w'" in msg or "w:" in msg or " w " in msg
    assert "float32" in msg and "bfloat16" in msg


def test_meta_target_with_wrong_shape_raises(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    ac.save({"w": torch.ones(4)}, ck)
    with torch.device("meta"):
        target = {"w": torch.empty(5)}
    with pytest.raises(ac.CheckpointError, match="w"):
        ac.load(target, ck)
    assert target["w"].is_meta


def test_tensor_versus_value_mismatch(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    ac.save({"t": torch.ones(1), "v": 5}, ck)
    with pytest.raises(ac.CheckpointError, match="t"):
        ac.load({"t": 1.0}, ck)
    with pytest.raises(ac.CheckpointError, match="v"):
        ac.load({"v": torch.zeros(1)}, ck)


# ---------------------------------------------------------------- unsupported values and pickle


class NotStateful:
    """Has the method names, but as data: it must be refused, not called."""

    state_dict = None
    load_state_dict = "no"


@pytest.mark.parametrize(
    "bad",
    [object(), range(3), int, slice(1), complex(1, 2), ..., NotStateful()],
    ids=["object", "range", "class", "slice", "complex", "ellipsis", "not_stateful"],
)
def test_unsupported_value_raises_type_error_naming_flat_key(tmp_path: Path, bad: object) -> None:
    ck = tmp_path / "c"
    sd = {"model": {"layers": [{"w": bad}]}, "ok": torch.ones(1)}
    with pytest.raises(TypeError, match=r"model\.layers\.0\.w"):
        ac.save(sd, ck)
    assert not ck.exists()
    assert _siblings(ck) == []  # nothing staged either


def test_unsupported_tensor_dtype_raises_type_error(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    with pytest.raises(TypeError, match="complex128"):
        ac.save({"z": torch.zeros(2, dtype=torch.complex128)}, ck)
    assert _siblings(ck) == []


def test_unsupported_dict_key_type_raises(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        ac.save({"a": {(1, 2): torch.ones(1)}}, tmp_path / "c")


def test_state_dict_must_be_a_dict(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        ac.save([torch.ones(1)], tmp_path / "c")  # type: ignore[arg-type]


class Opaque:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.x == self.x

    __hash__ = None  # type: ignore[assignment]


def test_allow_pickle_round_trip(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    sd = {"obj": Opaque(4), "s": {1, 2, 3}, "dt": torch.bfloat16, "t": torch.arange(3)}
    ac.save(sd, ck, allow_pickle=True)

    target: dict[str, Any] = {"obj": None, "s": None, "dt": None, "t": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(ac.CheckpointError, match="allow_pickle") as info:
        ac.load(target, ck)
    assert str(ck) in str(info.value)  # names the checkpoint
    assert target["obj"] is None and target["s"] is None

    ac.load(target, ck, allow_pickle=True)
    assert target["obj"] == Opaque(4)
    assert target["s"] == {1, 2, 3}
    assert target["dt"] is torch.bfloat16
    assert torch.equal(target["t"], torch.arange(3))


def test_pickled_checkpoint_refuses_to_load_without_allow_pickle(tmp_path: Path) -> None:
    """api.md: "a checkpoint that holds pickled data refuses to load unless allow_pickle=True"."""
    ck = tmp_path / "c"
    ac.save({"obj": Opaque(1), "t": torch.ones(2)}, ck, allow_pickle=True)
    target = {"t": torch.zeros(2)}  # does not even ask for the pickled key
    with pytest.raises(ac.CheckpointError, match="allow_pickle"):
        ac.load(target, ck)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    calls: list[str] = []

    def trap(name: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called during load")

        return refuse

    class TrapUnpickler:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls.append("pickle.Unpickler")
            raise AssertionError("pickle.Unpickler used during load")

    monkeypatch.setattr(pickle, "loads", trap("pickle.loads"))
    monkeypatch.setattr(pickle, "load", trap("pickle.load"))
    monkeypatch.setattr(pickle, "Unpickler", TrapUnpickler)
    monkeypatch.setattr(torch, "load", trap("torch.load"))
    yield calls


def _training_state() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_load_never_unpickles(tmp_path: Path, no_unpickling: list[str]) -> None:
    ck = tmp_path / "c"
    model, opt = _training_state()
    values = {"epoch": 3, "name": "run", "lrs": [0.1, 0.01], "blob": b"\x01", "cfg": {"a": None}}
    # Saving is allowed to do anything; only loading is under test.
    ac.save({"model": model, "optim": opt, "values": values}, ck)

    fresh_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fresh_opt = torch.optim.Adam(fresh_model.parameters(), lr=1e-3)
    target = {
        "model": fresh_model,
        "optim": fresh_opt,
        "values": {"epoch": 0, "name": "", "lrs": [0.0, 0.0], "blob": b"", "cfg": {"a": 1}},
    }
    ac.load(target, ck)
    ac.read_metadata(ck)
    assert no_unpickling == []
    assert target["values"] == values
    for k, v in model.state_dict().items():
        assert_bits_equal(fresh_model.state_dict()[k], v, k)
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].shape == (8, 4)


def test_pickle_refusal_does_not_unpickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = tmp_path / "c"
    ac.save({"obj": Opaque(2)}, ck, allow_pickle=True)
    calls: list[str] = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append("loads"))
    with pytest.raises(ac.CheckpointError):
        ac.load({"obj": None}, ck)
    assert calls == []


# ---------------------------------------------------------------- missing / uncommitted checkpoints


def test_load_missing_checkpoint_raises(tmp_path: Path) -> None:
    target = {"a": torch.zeros(1)}
    with pytest.raises(ac.CheckpointError, match="nope"):
        ac.load(target, tmp_path / "nope")
    assert torch.equal(target["a"], torch.zeros(1))


def test_read_metadata_missing_raises(tmp_path: Path) -> None:
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(tmp_path / "nope")


def test_read_metadata_uncommitted_directory_raises(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    ac.save({"a": torch.ones(3)}, ck)
    (ck / "metadata.json").unlink()
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(ck)
    with pytest.raises(ac.CheckpointError):
        ac.load({"a": torch.zeros(3)}, ck)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(empty)


# ---------------------------------------------------------------- storage selection


@pytest.mark.parametrize("bad_id", ["foo://x", "nosuchscheme://bucket/ckpt"])
def test_unknown_scheme_cannot_be_detected(bad_id: str) -> None:
    with pytest.raises(RuntimeError, match="Cannot detect"):
        ac.save({"a": torch.ones(1)}, bad_id)
    with pytest.raises(RuntimeError, match="Cannot detect"):
        ac.load({"a": torch.ones(1)}, bad_id)
    with pytest.raises(RuntimeError, match="Cannot detect"):
        ac.read_metadata(bad_id)


def test_non_path_id_cannot_be_detected() -> None:
    with pytest.raises(RuntimeError, match="Cannot detect"):
        ac.read_metadata(12345)


def test_file_url_and_pathlike_ids(tmp_path: Path) -> None:
    t = torch.randn(5)
    ck = tmp_path / "viaurl"
    ac.save({"t": t}, f"file://{ck}")
    assert (ck / "metadata.json").is_file()
    out = {"t": torch.zeros(5)}
    ac.load(out, ck)  # pathlib.Path
    assert torch.equal(out["t"], t)
    out2 = {"t": torch.zeros(5)}
    ac.load(out2, str(ck))  # plain str
    assert torch.equal(out2["t"], t)
    out3 = {"t": torch.zeros(5)}
    ac.load(out3, f"file://{ck}")
    assert torch.equal(out3["t"], t)
    assert ac.read_metadata(f"file://{ck}").tensors["t"].shape == (5,)


def test_relative_path_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    t = torch.randn(3)
    ac.save({"t": t}, "rel/ckpt")
    assert (tmp_path / "rel" / "ckpt" / "metadata.json").is_file()
    out = {"t": torch.zeros(3)}
    ac.load(out, os.path.join("rel", "ckpt"))
    assert torch.equal(out["t"], t)


@pytest.fixture
def memory_url() -> Iterator[str]:
    name = f"async-ckpt-test-{uuid.uuid4().hex}"
    yield f"memory://{name}/ckpt"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def test_memory_fsspec_round_trip(memory_url: str) -> None:
    torch.manual_seed(0)
    src = {"w": torch.randn(64, 33), "b": torch.randn(7).to(torch.bfloat16), "step": 9, "tag": b"\x00"}
    md = ac.save(src, memory_url)
    assert set(md.tensors) == {"w", "b"}
    assert ac.read_metadata(memory_url).tensors["w"].shape == (64, 33)
    target = {"w": torch.zeros(64, 33), "b": torch.zeros(7, dtype=torch.bfloat16), "step": 0, "tag": b""}
    w = target["w"]
    ac.load(target, memory_url)
    assert target["w"] is w
    assert_bits_equal(target["w"], src["w"])
    assert_bits_equal(target["b"], src["b"])
    assert target["step"] == 9 and target["tag"] == b"\x00"


def test_memory_fsspec_overwrite_and_missing(memory_url: str) -> None:
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(memory_url)
    ac.save({"a": torch.ones(3)}, memory_url)
    ac.save({"a": torch.full((3,), 2.0), "b": torch.ones(1)}, memory_url)
    out = {"a": torch.zeros(3), "b": torch.zeros(1)}
    ac.load(out, memory_url)
    assert torch.equal(out["a"], torch.full((3,), 2.0))
    assert set(ac.read_metadata(memory_url).tensors) == {"a", "b"}
