"""The local commit publishes a checkpoint only when every shard its metadata names is in place."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import async_ckpt as ac
from async_ckpt.errors import CheckpointError
from async_ckpt.format.metadata import METADATA_FILE
from async_ckpt.storage.local import LocalStorage, staging_dir


def _saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = {f"w{i}": torch.full((4096,), float(i)) for i in range(4)}
    src = tmp_path / "src"
    ac.save(state, src)
    return src, state


def _stage_copy(src: Path, storage: LocalStorage, location: str, token: str, skip: str | None) -> list[str]:
    storage.begin_save(location, token)
    shards = sorted(p.name for p in src.iterdir() if p.name != METADATA_FILE)
    for name in shards:
        if name != skip:
            shutil.copyfile(src / name, staging_dir(location, token) / name)
    return shards


def test_commit_refuses_a_staging_directory_missing_a_shard_the_metadata_names(tmp_path: Path) -> None:
    src, _ = _saved(tmp_path)
    storage = LocalStorage()
    location = str(tmp_path / "dst")
    shards = _stage_copy(src, storage, location, "ab" * 8, skip=None)
    (staging_dir(location, "ab" * 8) / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[-1]}.*missing"):
        storage.commit(location, "ab" * 8, (src / METADATA_FILE).read_bytes())
    assert not Path(location).exists()


def test_commit_refuses_a_shard_of_the_wrong_size(tmp_path: Path) -> None:
    src, _ = _saved(tmp_path)
    storage = LocalStorage()
    location = str(tmp_path / "dst")
    shards = _stage_copy(src, storage, location, "cd" * 8, skip=None)
    with open(staging_dir(location, "cd" * 8) / shards[0], "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match=rf"{shards[0]}.*bytes"):
        storage.commit(location, "cd" * 8, (src / METADATA_FILE).read_bytes())
    assert not Path(location).exists()


def test_commit_with_every_shard_in_place_publishes_a_loadable_checkpoint(tmp_path: Path) -> None:
    src, state = _saved(tmp_path)
    storage = LocalStorage()
    location = str(tmp_path / "dst")
    _stage_copy(src, storage, location, "ef" * 8, skip=None)
    storage.commit(location, "ef" * 8, (src / METADATA_FILE).read_bytes())
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    ac.load(got, location)
    assert all(torch.equal(got[k], state[k]) for k in state)
