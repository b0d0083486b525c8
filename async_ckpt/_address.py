"""The memory address of a buffer: where the O_DIRECT writer can send bytes from without a copy."""

from __future__ import annotations

import ctypes

__all__ = ["address_of"]


class _Buffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (stable since 3.11), for the address of a read-only buffer."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def address_of(data: memoryview) -> int:
    """Where a contiguous buffer's first byte lies in memory.

    Unlike ctypes' ``from_buffer``, this takes read-only buffers too (the worker's staging maps).
    """
    view = _Buffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(data), ctypes.byref(view), 0)
    try:
        return view.buf or 0
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))
