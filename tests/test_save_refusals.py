"""What a save refuses up front, before anything is written, naming the key.

* Tensors without plain strided storage: sparse (COO, CSR, CSC, BSR), mkldnn,
  nested (strided and jagged) and storage-less subclasses (a FakeTensor) raise
  ``TypeError`` naming the key and the fix, through ``ac.save`` and
  ``AsyncCheckpointer.save``, also when such a tensor replaces a dense one of
  the same shape after a save (the async path's layout cache must not let it
  through). A plain ``torch.Tensor`` subclass with real storage still saves.
* Keys that UTF-8 cannot encode (a lone surrogate), anywhere in the tree: the
  shard header must be valid JSON for ``safetensors.safe_open``, so they raise
  ``ValueError`` naming the key (escaped), and nothing is written.

``ShardedTensor`` needs a process group: tests/test_save_failures_dist.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt as ac

# Building the refused tensors is what warns here, not the library.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse .* support is in beta:UserWarning"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning"),
]


@pytest.fixture(scope="module")
def ck() -> Iterator[ac.AsyncCheckpointer]:
    with ac.AsyncCheckpointer(timeout=120.0) as c:
        yield c


def _fake() -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.ones(2, 2)


# name -> (tensor factory, a word the error's hint must contain)
STORAGELESS: dict[str, tuple[Callable[[], torch.Tensor], str]] = {
    "sparse_coo": (lambda: torch.eye(3).to_sparse(), "to_dense"),
    "sparse_csr": (lambda: torch.eye(3).to_sparse_csr(), "to_dense"),
    "sparse_csc": (lambda: torch.eye(3).to_sparse_csc(), "to_dense"),
    "sparse_bsr": (lambda: torch.eye(4).to_sparse_bsr((2, 2)), "to_dense"),
    "mkldnn": (lambda: torch.ones(2, 2).to_mkldnn(), "to_dense"),
    "nested": (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "unbind"),
    "nested_jagged": (
        lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
        "unbind",
    ),
    "fake_tensor": (_fake, "plain tensor"),
}


def _save_blocking(sd: dict[str, Any], path: Path, ck: ac.AsyncCheckpointer) -> None:
    ac.save(sd, path)


def _save_async(sd: dict[str, Any], path: Path, ck: ac.AsyncCheckpointer) -> None:
    ck.save(sd, path).result(120)


SAVERS = {"ac.save": _save_blocking, "AsyncCheckpointer.save": _save_async}


def _nothing_written(tmp_path: Path) -> bool:
    return not any(tmp_path.rglob("*"))


@pytest.mark.parametrize("saver", SAVERS)
@pytest.mark.parametrize("kind", STORAGELESS)
def test_storageless_tensor_is_refused_naming_key_and_fix(
    tmp_path: Path, ck: ac.AsyncCheckpointer, kind: str, saver: str
) -> None:
    make, hint = STORAGELESS[kind]
    sd = {"model": {"layers": [{"odd": make()}]}, "ok": torch.ones(3), "step": 1}
    with pytest.raises(TypeError) as info:
        SAVERS[saver](sd, tmp_path / "c", ck)
    msg = str(info.value)
    assert "model.layers.0.odd" in msg, msg
    assert hint in msg, msg
    assert _nothing_written(tmp_path), sorted(tmp_path.rglob("*"))


def test_sparse_tensor_replacing_a_dense_one_is_refused_after_a_save(
    tmp_path: Path, ck: ac.AsyncCheckpointer
) -> None:
    # Same key, shape, dtype and device: only the layout changed, so a cached
    # plan keyed on those would have let it through to the staging copy.
    dense = torch.eye(3)
    ck.save({"w": dense, "b": torch.ones(2)}, tmp_path / "dense").result(120)
    with pytest.raises(TypeError, match=r"'w'.*to_dense"):
        ck.save({"w": dense.to_sparse(), "b": torch.ones(2)}, tmp_path / "sparse").result(120)
    nested = torch.nested.nested_tensor([torch.ones(3), torch.ones(3), torch.ones(3)])
    with pytest.raises(TypeError, match=r"'w'.*unbind"):
        ck.save({"w": nested, "b": torch.ones(2)}, tmp_path / "nested").result(120)
    assert not (tmp_path / "sparse").exists() and not (tmp_path / "nested").exists()
    # The checkpointer is still usable.
    ck.save({"w": dense * 2, "b": torch.ones(2)}, tmp_path / "after").result(120)
    target = {"w": torch.zeros(3, 3), "b": torch.zeros(2)}
    ac.load(target, tmp_path / "after")
    assert torch.equal(target["w"], dense * 2)


class _Tagged(torch.Tensor):
    """A subclass with the tensor's own storage (as a user might tag parameters)."""


@pytest.mark.parametrize("saver", SAVERS)
def test_tensor_subclass_with_storage_still_saves(
    tmp_path: Path, ck: ac.AsyncCheckpointer, saver: str
) -> None:
    value = torch.arange(6.0).reshape(2, 3).as_subclass(_Tagged)
    SAVERS[saver]({"t": value, "p": torch.nn.Parameter(torch.ones(2))}, tmp_path / "c", ck)
    target = {"t": torch.zeros(2, 3), "p": torch.zeros(2)}
    ac.load(target, tmp_path / "c")
    assert torch.equal(target["t"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(target["p"], torch.ones(2))


BAD_KEYS: dict[str, tuple[dict[str, Any], str]] = {
    "top_level_tensor": ({"\ud800x": torch.ones(2)}, "\\ud800x"),
    "nested_tensor_key": ({"model": {"ok": torch.ones(1), "w\udcff": torch.ones(2)}}, "model.w\\udcff"),
    "inside_a_list": ({"opt": [{"\ud83d": torch.ones(2)}]}, "opt.0.\\ud83d"),
    "value_key": ({"t": torch.ones(1), "meta": {"\udfff": 3}}, "meta.\\udfff"),
}


@pytest.mark.parametrize("saver", SAVERS)
@pytest.mark.parametrize("case", BAD_KEYS)
def test_key_that_utf8_cannot_encode_is_refused_naming_it(
    tmp_path: Path, ck: ac.AsyncCheckpointer, case: str, saver: str
) -> None:
    sd, shown = BAD_KEYS[case]
    with pytest.raises(ValueError) as info:
        SAVERS[saver](sd, tmp_path / "c", ck)
    msg = str(info.value)
    assert shown in msg, msg
    assert "UTF-8" in msg, msg
    msg.encode("utf-8")  # the message itself must be printable anywhere
    assert _nothing_written(tmp_path), sorted(tmp_path.rglob("*"))


def test_every_shard_opens_with_safetensors_for_non_ascii_keys(tmp_path: Path) -> None:
    # The counterpart of the refusal: valid non-ASCII keys stay allowed and readable.
    from safetensors import safe_open

    sd = {"poids_é": torch.ones(2), "层": {"权重": torch.arange(3.0)}, "emoji_🙂": torch.zeros(1)}
    ac.save(sd, tmp_path / "c")
    names: set[str] = set()
    for shard in (tmp_path / "c").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names.update(f.keys())
    assert names == {"poids_é", "层.权重", "emoji_🙂"}, names
