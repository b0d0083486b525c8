"""The public surface: what ``import async_ckpt`` offers, and that docs/api.md documents all of it.

Every exception class defined anywhere in the package is either exported from
``async_ckpt`` (and listed in ``__all__``) or named below as internal, with the
reason; a new exception class fails this test until someone decides which.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import async_ckpt as ac

_API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"

# Exceptions that never reach a caller as themselves.
_INTERNAL_ERRORS = {
    # caught inside format.values and re-raised as CorruptCheckpointError naming the key
    "async_ckpt.format.value_kinds.Malformed",
    # only ever the __cause__ of a CheckpointError, carrying the worker's traceback text
    "async_ckpt.inflight.RemoteError",
    # the planner's own check: a ValueError, re-raised as CorruptCheckpointError on load
    "async_ckpt.planning.validate.PlanValidationError",
    # dcp_blob: a blob only full unpickling reads; its callers catch it and say so
    "async_ckpt.interop.dcp_blob.NeedsPickle",
}

# Not walked: integrations import optional frameworks; testing (the pytest plugin) has its own surface.
_SKIP_IMPORT = ("async_ckpt.integrations.", "async_ckpt.testing.")


def _package_modules() -> list[str]:
    names = ["async_ckpt"]
    for info in pkgutil.walk_packages(ac.__path__, prefix="async_ckpt."):
        if info.name.startswith(_SKIP_IMPORT):
            continue
        names.append(info.name)
    return names


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for name in _package_modules():
        module = importlib.import_module(name)
        if any(part.startswith("_") for part in name.split(".")):
            continue  # private modules (_faults: the test suite's fault hooks)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")
            ):
                found[f"{name}.{attr}"] = value
    return found


def test_every_public_exception_class_is_exported_and_in_all() -> None:
    classes = _exception_classes()
    assert "async_ckpt.errors.CheckpointError" in classes  # the walk found the package's errors
    missing = []
    for qualified, cls in sorted(classes.items()):
        if qualified in _INTERNAL_ERRORS:
            continue
        if getattr(ac, cls.__name__, None) is not cls or cls.__name__ not in ac.__all__:
            missing.append(qualified)
    assert not missing, f"exception classes not exported from async_ckpt (or not in __all__): {missing}"


def test_internal_exceptions_named_here_still_exist() -> None:
    classes = _exception_classes()
    gone = sorted(_INTERNAL_ERRORS - classes.keys())
    assert not gone, f"remove from _INTERNAL_ERRORS: {gone}"


def test_all_names_exist_and_are_unique() -> None:
    assert len(ac.__all__) == len(set(ac.__all__))
    for name in ac.__all__:
        assert hasattr(ac, name), name


def test_save_stats_and_stateful_are_exported() -> None:
    from async_ckpt._tree import Stateful
    from async_ckpt.format.metadata import SaveStats

    assert ac.SaveStats is SaveStats
    assert ac.Stateful is Stateful
    assert {"SaveStats", "Stateful"} <= set(ac.__all__)


def test_every_name_in_all_is_documented_in_api_md() -> None:
    doc = _API_DOC.read_text(encoding="utf-8")
    # Documented means named in code form: `ac.save(...`, `ac.SaveStats`, `SaveStats`.
    undocumented = [n for n in ac.__all__ if not re.search(rf"`(?:ac\.)?{re.escape(n)}\b", doc)]
    assert not undocumented, f"names in async_ckpt.__all__ that docs/api.md does not document: {undocumented}"


def test_source_version_matches_pyproject() -> None:
    import tomllib

    from async_ckpt import _version

    project = tomllib.loads((_API_DOC.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert _version._SOURCE_VERSION == project["version"]
