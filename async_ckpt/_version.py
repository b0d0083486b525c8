"""The package's version: the installed distribution's, else the source tree's."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

_SOURCE_VERSION = "0.1.0"  # keep equal to pyproject.toml's; used when running from a source tree

try:
    __version__: str = version("async-ckpt")
except PackageNotFoundError:
    __version__ = _SOURCE_VERSION
