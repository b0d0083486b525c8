"""OrderedDict / defaultdict keep their kind, without pickle (issue 12 section 2).

Checked through real checkpoints on disk: into a target (its own containers
filled in place), through ``AsyncCheckpointer``, and without a target
(``load_state_dict``), plus the value encoding of one nested in a plain value.
"""

from __future__ import annotations

import collections
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt as ac
from async_ckpt.format.metadata import METADATA_FILE, Metadata, decode_metadata, encode_metadata
from async_ckpt.format.values import decode_value, encode_value

FIXTURES = Path(__file__).parent / "fixtures"


def _read_md(ckpt: Path) -> Metadata:
    return decode_metadata((ckpt / METADATA_FILE).read_bytes(), where=str(ckpt))


def _state() -> dict[str, Any]:
    od = collections.OrderedDict([("z", torch.arange(3.0)), ("a", 5)])
    dd_list: collections.defaultdict[str, Any] = collections.defaultdict(list, {"w": torch.ones(2)})
    dd_lambda: collections.defaultdict[str, Any] = collections.defaultdict(lambda: 7, {"k": torch.zeros(1)})
    return {"od": od, "dd": dd_list, "dl": dd_lambda, "plain": {"t": torch.ones(1)}}


@pytest.fixture(scope="module")
def ck() -> Iterator[ac.AsyncCheckpointer]:
    with ac.AsyncCheckpointer(start=True, timeout=60) as c:
        yield c


def _check_no_target(got: dict[str, Any]) -> None:
    assert type(got["od"]) is collections.OrderedDict and list(got["od"]) == ["z", "a"]
    assert torch.equal(got["od"]["z"], torch.arange(3.0)) and got["od"]["a"] == 5
    assert type(got["dd"]) is collections.defaultdict and got["dd"].default_factory is list
    assert torch.equal(got["dd"]["w"], torch.ones(2))
    # A factory that is not a builtin is never looked up from the file.
    assert type(got["dl"]) is collections.defaultdict and got["dl"].default_factory is None
    assert type(got["plain"]) is dict


def test_ordereddict_and_defaultdict_come_back_with_their_kind_from_load_state_dict(tmp_path: Path) -> None:
    ac.save(_state(), tmp_path / "c", allow_pickle=False)
    _check_no_target(ac.load_state_dict(tmp_path / "c", allow_pickle=False))


def test_ordereddict_and_defaultdict_kind_through_async_checkpointer(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    ck.save(_state(), tmp_path / "c").result(timeout=120)
    _check_no_target(ac.load_state_dict(tmp_path / "c", allow_pickle=False))


def test_dict_kind_is_recorded_in_the_saved_tree(tmp_path: Path) -> None:
    ac.save(_state(), tmp_path / "c")
    tree = _read_md(tmp_path / "c").tree
    nodes = dict(tree["d"])
    assert nodes["od"]["kind"] == "OrderedDict"
    assert nodes["dd"]["kind"] == "defaultdict" and nodes["dd"]["factory"] == "list"
    assert nodes["dl"]["kind"] == "defaultdict" and "factory" not in nodes["dl"]
    assert set(nodes["plain"]) == {"d"}


def test_target_containers_are_filled_in_place_and_keep_their_type(tmp_path: Path) -> None:
    ac.save(_state(), tmp_path / "c")
    target = {"od": {"z": torch.zeros(3), "a": 0}, "dd": collections.OrderedDict(w=torch.zeros(2))}
    target["dl"] = collections.defaultdict(int, k=torch.ones(1))
    target["plain"] = collections.OrderedDict(t=torch.zeros(1))
    od, dd, dl = target["od"], target["dd"], target["dl"]
    ac.load(target, tmp_path / "c", allow_pickle=False)
    assert target["od"] is od and type(od) is dict and od["a"] == 5
    assert torch.equal(od["z"], torch.arange(3.0))
    assert target["dd"] is dd and type(dd) is collections.OrderedDict and torch.equal(dd["w"], torch.ones(2))
    assert target["dl"] is dl and dl.default_factory is int and torch.equal(dl["k"], torch.zeros(1))


def test_missing_part_of_a_target_is_rebuilt_with_its_saved_kind(tmp_path: Path) -> None:
    opt_like = _Holder({"plain": {"t": torch.zeros(1)}})
    ac.save({"s": _Holder(_state())}, tmp_path / "w")
    ac.load({"s": opt_like}, tmp_path / "w")
    _check_no_target(opt_like.sd)


class _Holder:
    """A Stateful that is not a module: saved parts it lacks are rebuilt from the tree."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self.sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.sd = sd


def test_ordereddict_and_defaultdict_as_values_keep_their_kind() -> None:
    value = [collections.OrderedDict([("b", 1), ("a", {2, 3})]), collections.defaultdict(set, {"x": 1})]
    value.append(collections.defaultdict(lambda: 1, {1: "y"}))
    enc = json.loads(json.dumps(encode_value(value, fqn="v", allow_pickle=False)))
    got = decode_value(enc, fqn="v", allow_pickle=False)
    assert type(got[0]) is collections.OrderedDict and list(got[0].items()) == [("b", 1), ("a", {2, 3})]
    assert type(got[1]) is collections.defaultdict and got[1].default_factory is set and got[1]["x"] == 1
    assert type(got[2]) is collections.defaultdict and got[2].default_factory is None and got[2][1] == "y"


def test_defaultdict_factory_in_a_hostile_file_is_never_imported(tmp_path: Path) -> None:
    ac.save(_state(), tmp_path / "c")
    md = _read_md(tmp_path / "c")
    for pair in md.tree["d"]:
        if pair[0] == "dd":
            pair[1]["factory"] = "os.system"
    (tmp_path / "c" / METADATA_FILE).write_bytes(encode_metadata(md))
    got = ac.load_state_dict(tmp_path / "c")
    assert type(got["dd"]) is collections.defaultdict and got["dd"].default_factory is None


def test_old_checkpoint_still_loads_without_a_target(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "v1_plain_lists", tmp_path / "c")
    got = ac.load_state_dict(tmp_path / "c")
    assert isinstance(got, dict) and got


def test_convert_to_torch_keeps_ordereddict_and_defaultdict_items(tmp_path: Path) -> None:
    from async_ckpt.cli import main

    ac.save(_state(), tmp_path / "c")
    assert main(["convert", str(tmp_path / "c"), "--to", "torch", str(tmp_path / "out.pt")]) == 0
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(state["od"]) == ["z", "a"] and torch.equal(state["od"]["z"], torch.arange(3.0))
    assert torch.equal(state["dd"]["w"], torch.ones(2)) and torch.equal(state["dl"]["k"], torch.zeros(1))
