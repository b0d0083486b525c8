"""The pytest plugin async_ckpt.testing, run as an inner pytest on temporary test files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from async_ckpt.testing import assert_state_dicts_equal, same_bits

REPO = Path(__file__).resolve().parents[1]


def _inner_pytest(
    tmp_path: Path,
    source: str,
    *,
    python: str = sys.executable,
    repo_on_path: bool = True,
    plugin_arg: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(source))
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    run_env["PYTHONPATH"] = str(REPO) if repo_on_path else ""
    run_env.update(env or {})
    args = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if plugin_arg:
        args += ["-p", "async_ckpt.testing"]
    return subprocess.run(
        [*args, "test_inner.py"], cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=600
    )


def _pids(d: Path, name: str, world: int) -> list[str]:
    return [(d / f"{name}.{r}").read_text() for r in range(world)]


@pytest.mark.slow
def test_plain_and_async_bodies_run_on_every_rank_of_one_reused_pool(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    out = _inner_pytest(
        tmp_path,
        """
        import os
        import pytest
        import torch
        import torch.distributed as dist
        import async_ckpt as ac
        from async_ckpt.testing import assert_state_dicts_equal

        def _record(rank, name):
            with open(os.path.join(os.environ["PIDS_DIR"], f"{name}.{rank.rank}"), "w") as f:
                f.write(str(os.getpid()))

        @pytest.mark.ranks(3)
        def test_plain(rank):
            assert dist.get_world_size() == 3 and dist.get_rank() == rank.rank
            t = torch.tensor([rank.rank + 1])
            dist.all_reduce(t)
            assert int(t) == 6
            _record(rank, "plain")

        @pytest.mark.ranks(3)
        @pytest.mark.parametrize("n", [4, 7])
        async def test_async_save_on_every_rank(rank, ckpt_dir, n):
            sd = {"w": torch.arange(n * 3, dtype=torch.float32), f"r{rank.rank}": torch.full((2,), rank.rank)}
            pending = await ac.async_save(sd, ckpt_dir / str(n))
            await pending
            back = {k: torch.zeros_like(v) for k, v in sd.items()}
            ac.load(back, ckpt_dir / str(n))
            assert_state_dicts_equal(back, sd)
            _record(rank, f"async{n}")

        class TestInClass:
            @pytest.mark.ranks(3)
            def test_mesh(self, mesh, rank):
                assert mesh.size() == 3 and mesh.get_local_rank() == rank.rank
                _record(rank, "mesh")
        """,
        env={"PIDS_DIR": str(pids)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 passed" in out.stdout
    first = _pids(pids, "plain", 3)
    assert len(set(first)) == 3
    for name in ("async4", "async7", "mesh"):
        assert _pids(pids, name, 3) == first, f"{name} ran on other processes than the first test"


@pytest.mark.slow
def test_hanging_rank_is_named_and_the_next_test_passes(tmp_path: Path) -> None:
    out = _inner_pytest(
        tmp_path,
        """
        import time
        import pytest
        import torch.distributed as dist

        @pytest.mark.ranks(2, timeout=20)
        def test_rank_1_hangs(rank):
            if rank.rank == 1:
                time.sleep(3600)

        @pytest.mark.ranks(2)
        def test_after(rank):
            dist.barrier()
        """,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 failed, 1 passed" in out.stdout, out.stdout
    assert "rank(s) [1] did not finish within 20s in test_inner.py::test_rank_1_hangs" in out.stdout
    assert "time.sleep(3600)" in out.stdout or "in test_rank_1_hangs" in out.stdout, out.stdout


@pytest.mark.slow
def test_failing_rank_traceback_is_the_failure_and_env_is_reset(tmp_path: Path) -> None:
    out = _inner_pytest(
        tmp_path,
        """
        import os
        import pytest
        import torch.distributed as dist

        @pytest.mark.ranks(2)
        def test_sets_env(rank):
            assert "LEAKED" not in os.environ
            os.environ["LEAKED"] = "1"

        @pytest.mark.ranks(2)
        def test_env_was_undone(rank):
            assert "LEAKED" not in os.environ

        @pytest.mark.ranks(2)
        def test_rank_1_raises(rank):
            if rank.rank == 1:
                raise ValueError("only on rank one")
            dist.barrier()

        @pytest.mark.ranks(2)
        def test_after(rank):
            dist.barrier()
        """,
    )
    assert "1 failed, 3 passed" in out.stdout, out.stdout + out.stderr
    assert "rank 1 failed in test_inner.py::test_rank_1_raises" in out.stdout
    assert "ValueError: only on rank one" in out.stdout
    assert "rank(s) [0] still running" in out.stdout


def test_fixture_that_cannot_pickle_is_refused_by_name(tmp_path: Path) -> None:
    out = _inner_pytest(
        tmp_path,
        """
        import pytest

        @pytest.fixture
        def opener():
            return lambda: 1

        @pytest.mark.ranks(2)
        def test_uses_it(rank, opener):
            pass

        def test_rank_without_marker(rank):
            pass
        """,
    )
    assert "fixture 'opener' cannot be sent to the rank processes" in out.stdout, out.stdout
    assert "fixture 'rank' exists only in tests marked @pytest.mark.ranks(n)" in out.stdout, out.stdout


def test_plugin_loads_without_torch() -> None:
    # pytest loads the plugin in every session of an environment that installs it:
    # neither the package nor the plugin may need torch to load (the pool and the
    # asserts import it when a test uses them).
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch import refused: " + name)

        sys.meta_path.insert(0, NoTorch())
        import async_ckpt
        import async_ckpt.testing as mod
        print(sorted(n for n in ("rank", "mesh", "ckpt_dir", "pytest_pyfunc_call") if hasattr(mod, n)))
        print(async_ckpt.__version__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "['ckpt_dir', 'mesh', 'pytest_pyfunc_call', 'rank']"


def test_the_package_imports_its_public_names_on_first_use() -> None:
    code = "import async_ckpt, sys; print('torch' in sys.modules); print(async_ckpt.save.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "async_ckpt.api"]


def test_state_dict_assert_names_the_differing_key() -> None:
    sd = {"model": {"w": torch.zeros(3), "b": torch.ones(2, dtype=torch.bfloat16)}, "step": 3}
    other = {"model": {"w": torch.tensor([0.0, -0.0, 0.0]), "b": sd["model"]["b"].clone()}, "step": 3}
    assert torch.equal(sd["model"]["w"], other["model"]["w"])  # equal by value, not by bits
    with pytest.raises(AssertionError, match=r"model\.w: bytes differ, first at flat index 1"):
        assert_state_dicts_equal(other, sd)
    with pytest.raises(AssertionError, match=r"<root>: missing keys \['step'\]"):
        assert_state_dicts_equal({"model": sd["model"]}, sd)
    with pytest.raises(AssertionError, match=r"model\.b: dtype torch.float32 != torch.bfloat16"):
        assert_state_dicts_equal({"model": {"w": sd["model"]["w"], "b": torch.ones(2)}, "step": 3}, sd)
    assert_state_dicts_equal({"model": {k: v.clone() for k, v in sd["model"].items()}, "step": 3}, sd)
    nan = torch.tensor([float("nan")])
    assert not same_bits(nan, -nan)


@pytest.mark.slow
def test_plugin_works_in_a_fresh_project_from_its_entry_point(tmp_path: Path) -> None:
    # A venv that sees the installed dependencies but gets async-ckpt itself from a
    # plain (not editable) install of this tree: only the pytest11 entry point loads the plugin.
    # --without-pip: the venv would otherwise shadow the installed setuptools with ensurepip's older one.
    src = tmp_path / "src"
    shutil.copytree(REPO / "async_ckpt", src / "async_ckpt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        timeout=300,
    )
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    project = tmp_path / "project"
    project.mkdir()
    out = _inner_pytest(
        project,
        """
        import pytest
        import torch
        import async_ckpt as ac
        from async_ckpt.testing import assert_state_dicts_equal

        @pytest.mark.ranks(2)
        async def test_users_save(rank, ckpt_dir):
            sd = {"w": torch.arange(6.0), f"own{rank.rank}": torch.ones(1) * rank.rank}
            await (await ac.async_save(sd, ckpt_dir))
            back = {k: torch.zeros_like(v) for k, v in sd.items()}
            ac.load(back, ckpt_dir)
            assert_state_dicts_equal(back, sd)
        """,
        python=python,
        repo_on_path=False,
        plugin_arg=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout


@pytest.mark.slow
def test_docs_fsdp2_example_passes(tmp_path: Path) -> None:
    text = (REPO / "docs" / "testing.md").read_text()
    section = text[text.index("## Example: FSDP2") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("\n```", start)]
    out = _inner_pytest(tmp_path, code)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout, out.stdout


@pytest.mark.slow
def test_pytest_timeout_interrupting_a_ranks_test_does_not_leak_into_the_next(tmp_path: Path) -> None:
    out = _inner_pytest(
        tmp_path,
        """
        import time
        import pytest
        import torch.distributed as dist

        @pytest.mark.timeout(20, method="signal")
        @pytest.mark.ranks(2, timeout=600)
        def test_interrupted(rank):
            if rank.rank == 1:
                time.sleep(3600)

        @pytest.mark.ranks(2, timeout=60)
        def test_after(rank):
            dist.barrier()
        """,
    )
    assert "1 failed, 1 passed" in out.stdout, out.stdout + out.stderr
    assert "Timeout" in out.stdout


@pytest.mark.slow
def test_ranks_see_the_environment_of_the_pytest_process_at_call_time(tmp_path: Path) -> None:
    # A session fixture (an S3 server, say) may set variables after the pool's ranks were
    # spawned; a ranks test must see them, as it would in processes spawned for it.
    out = _inner_pytest(
        tmp_path,
        """
        import os
        import pytest

        @pytest.mark.ranks(2)
        def test_first(rank):
            assert "INNER_LATE_VAR" not in os.environ

        def test_set_late():
            os.environ["INNER_LATE_VAR"] = "set after the pool started"
            os.environ.pop("INNER_EARLY_VAR")

        @pytest.mark.ranks(2)
        def test_second(rank):
            assert os.environ.get("INNER_LATE_VAR") == "set after the pool started", rank.rank
            assert "INNER_EARLY_VAR" not in os.environ, rank.rank
        """,
        env={"INNER_EARLY_VAR": "1"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 passed" in out.stdout, out.stdout
