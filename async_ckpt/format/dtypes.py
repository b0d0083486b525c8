"""The dtypes the on-disk format can describe, by their safetensors names."""

from __future__ import annotations

import torch

__all__ = ["SAFETENSORS_DTYPES", "dtype_from_name", "dtype_name", "safetensors_name"]

# Our own names are torch's (``float32``); the shard headers use safetensors'
# (``F32``) so that ``safetensors.safe_open`` reads every shard file.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

_BY_NAME: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in SAFETENSORS_DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    """Our metadata name of a supported dtype, e.g. ``bfloat16``."""
    if dtype not in SAFETENSORS_DTYPES:
        raise TypeError(
            f"dtype {dtype} cannot be stored: the safetensors format has no code for it. "
            f"Supported: {', '.join(sorted(_BY_NAME))}."
        )
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: object) -> torch.dtype:
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"unknown dtype {name!r}")
    return _BY_NAME[name]


def safetensors_name(dtype: torch.dtype) -> str:
    dtype_name(dtype)
    return SAFETENSORS_DTYPES[dtype]
