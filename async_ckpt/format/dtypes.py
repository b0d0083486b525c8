"""The dtypes the on-disk format can describe: our names, safetensors codes and item sizes.

Torch-free on purpose: the worker process writes shards and metadata by these
names and never imports torch (docs/architecture.md, "The worker"). Only
:func:`dtype_from_name` turns a name into a ``torch.dtype``, importing torch
when it is first called, which only the trainer and loaders do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "any_name",
    "check_name",
    "dtype_from_name",
    "dtype_name",
    "itemsize",
    "safetensors_name",
    "torch_dtype",
]

# Our own names are torch's (``float32``); the shard headers use safetensors'
# (``F32``) so that ``safetensors.safe_open`` reads every shard file.
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "float8_e4m3fnuz": ("F8_E4M3FNUZ", 1),
    "float8_e5m2fnuz": ("F8_E5M2FNUZ", 1),
    "complex64": ("C64", 8),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint64": ("U64", 8),
    "uint32": ("U32", 4),
    "uint16": ("U16", 2),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
"""name -> (safetensors code, bytes per element)."""


def dtype_name(dtype: torch.dtype | str) -> str:
    """Our metadata name of a supported dtype (a ``torch.dtype`` or its name), e.g. ``bfloat16``."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(
            f"dtype {dtype} cannot be stored: the safetensors format has no code for it. "
            f"Supported: {', '.join(sorted(DTYPES))}."
        )
    return name


def dtype_from_name(name: object) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    return torch_dtype(name)


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` called ``name``, supported here or not (a DCP checkpoint's ``complex128``)."""
    import torch

    return getattr(torch, name)  # type: ignore[no-any-return]


def any_name(dtype: torch.dtype | str) -> str:
    """The name of any torch dtype, supported here or not."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def check_name(name: object) -> str:
    """``name`` itself if it names a supported dtype, else ValueError (for reading metadata)."""
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    return name


def itemsize(dtype: torch.dtype | str) -> int:
    name = any_name(dtype)
    if name in DTYPES:
        return DTYPES[name][1]
    return torch_dtype(name).itemsize


def safetensors_name(dtype: torch.dtype | str) -> str:
    return DTYPES[dtype_name(dtype)][0]
