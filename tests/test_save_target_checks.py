"""What a save checks about its checkpoint id when it is called (issue 15, "a newcomer's rough edges").

- A local id that is a plain file, or lies under one, is refused by the call
  itself with an error naming the file, before anything is staged (an async
  save used to fail only at ``result()``, with the worker's traceback).
- Saving over a committed checkpoint replaces it, as DCP does, and says so in
  one INFO line naming the id.
"""

from __future__ import annotations

import asyncio
import logging
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import async_ckpt as ac
from async_ckpt import api


@pytest.fixture(scope="module")
def ck() -> Iterator[ac.AsyncCheckpointer]:
    c = api._default_checkpointer(None)
    c.start()
    yield c
    api._close_defaults()


def _sd(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((256,), v), "b": torch.arange(8.0) + v}


def _replace_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "async_ckpt" and r.levelno == logging.INFO and "replac" in r.getMessage()
    ]


# ---------------------------------------------------------------- a file in the way


@pytest.mark.parametrize("overlap", [False, True])
def test_async_save_to_a_plain_file_fails_at_the_call_naming_it(
    ck: ac.AsyncCheckpointer, tmp_path: Path, overlap: bool
) -> None:
    afile = tmp_path / "afile"
    afile.write_bytes(b"user data")
    for target in (afile, afile / "ckpt", afile / "deeper" / "ckpt"):
        with pytest.raises(ac.CheckpointError, match="not a directory") as info:
            ck.save(_sd(1), target, overlap=overlap)
        assert str(afile) in str(info.value)
        assert info.value.__traceback__ is not None and "worker" not in str(info.value)
    assert afile.read_bytes() == b"user data"
    # The checkpointer goes on: the refused saves left nothing behind.
    ck.save(_sd(2), tmp_path / "good", overlap=overlap).result(120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "good"]


def test_asyncio_async_save_to_a_plain_file_fails_at_the_call(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    afile = tmp_path / "afile"
    afile.write_bytes(b"user data")

    async def main() -> None:
        with pytest.raises(ac.CheckpointError, match="not a directory") as info:
            await ac.async_save(_sd(1), afile / "ckpt", overlap=True)
        assert str(afile) in str(info.value)

    asyncio.run(main())
    assert afile.read_bytes() == b"user data"


def test_blocking_save_to_a_plain_file_names_it(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_bytes(b"user data")
    for target in (afile, afile / "ckpt"):
        with pytest.raises(ac.CheckpointError, match="not a directory") as info:
            ac.save(_sd(1), target)
        assert str(afile) in str(info.value)
    assert afile.read_bytes() == b"user data"


# --------------------------------------------------------------------- overwrite


def test_blocking_save_over_a_committed_checkpoint_logs_one_info_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="async_ckpt")
    path = tmp_path / "ckpt"
    ac.save(_sd(1), path)
    assert _replace_lines(caplog) == [], "a first save replaces nothing"
    ac.save(_sd(2), path)
    lines = _replace_lines(caplog)
    assert len(lines) == 1 and str(path) in lines[0], lines
    assert torch.equal(ac.load_state_dict(path)["w"], _sd(2)["w"])


@pytest.mark.parametrize("overlap", [False, True])
def test_async_save_over_a_committed_checkpoint_logs_one_info_line(
    ck: ac.AsyncCheckpointer, tmp_path: Path, caplog: pytest.LogCaptureFixture, overlap: bool
) -> None:
    caplog.set_level(logging.INFO, logger="async_ckpt")
    path = tmp_path / "ckpt"
    ck.save(_sd(1), path, overlap=overlap).result(120)
    # An empty directory (what a user made for it) is no checkpoint either.
    (tmp_path / "empty").mkdir()
    ck.save(_sd(1), tmp_path / "empty", overlap=overlap).result(120)
    assert _replace_lines(caplog) == []
    ck.save(_sd(2), path, overlap=overlap).result(120)
    lines = _replace_lines(caplog)
    assert len(lines) == 1 and str(path) in lines[0], lines
    assert torch.equal(ac.load_state_dict(path)["w"], _sd(2)["w"])


# ------------------------------------------------------------------------- types


def test_module_async_save_is_typed_as_returning_pending_checkpoint() -> None:
    assert typing.get_type_hints(ac.async_save)["return"] is ac.PendingCheckpoint
