"""Bit-exact comparison of tensors and state dicts (DTensors by their full tensors)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["assert_bits_equal", "assert_state_dicts_equal", "raw_bytes", "same_bits"]


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as row-major bytes on CPU (0-dim, empty and bool tensors included)."""
    flat = _full(t).detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when dtype, shape and every byte match (NaN payloads and -0.0 included)."""
    a, b = _full(a), _full(b)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw_bytes(a), raw_bytes(b))


def assert_bits_equal(actual: Any, expected: torch.Tensor, what: str = "tensor") -> None:
    """Assert ``actual`` is a tensor bit-identical to ``expected``; the message starts with ``what``."""
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__qualname__}, not a tensor"
    actual, expected = _full(actual), _full(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, b = raw_bytes(actual), raw_bytes(expected)
    if not torch.equal(a, b):
        itemsize = max(1, actual.element_size())
        first = int((a != b).nonzero()[0]) // itemsize
        raise AssertionError(
            f"{what}: bytes differ, first at flat index {first}{_values_at(actual, expected, first)}"
        )


def _values_at(a: torch.Tensor, b: torch.Tensor, i: int) -> str:
    try:
        x, y = a.detach().cpu().reshape(-1)[i].item(), b.detach().cpu().reshape(-1)[i].item()
    except (RuntimeError, TypeError):  # dtypes without a Python scalar (some float8 kinds)
        return ""
    return f" ({x!r} != {y!r})"


def assert_state_dicts_equal(
    actual: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = ""
) -> None:
    """Assert two (nested) state dicts hold the same keys and bit-identical tensors.

    DTensors are compared by their full tensors (a collective: call on every rank);
    other values with ``==``. The message names the first differing key path.
    """
    _compare(actual, expected, prefix)


def _compare(actual: Any, expected: Any, path: str) -> None:
    where = path or "<root>"
    if isinstance(expected, torch.Tensor):
        assert_bits_equal(actual, expected, where)
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{where}: got {type(actual).__qualname__}, not a mapping"
        missing = [k for k in expected if k not in actual]
        extra = [k for k in actual if k not in expected]
        assert not missing and not extra, f"{where}: missing keys {missing}, unexpected keys {extra}"
        for k in expected:
            _compare(actual[k], expected[k], f"{path}.{k}" if path else str(k))
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected), (
            f"{where}: got {type(actual).__qualname__}, not {type(expected).__qualname__}"
        )
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _compare(a, e, f"{path}[{i}]")
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
