"""Host staging buffers: shared memory, pinned under CUDA, allocated once per layout and reused.

A *layout* is the list of (key, shape, dtype) a rank stages; its tensors are
packed, 64-byte aligned, into a few large anonymous shared-memory segments
(``memfd``), so the worker process gets a handful of file descriptors once and
maps them, never one per tensor. A *slot* is one full set of buffers for a
layout; the pool keeps at most ``max_in_flight`` slots, and a save that finds
none free waits until the worker releases one. Segments have no name in
``/dev/shm``, so nothing is left behind even if a process is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ._libc import libc
from .buffer_layout import BufferSpec, Key, Layout, make_layout
from .errors import CheckpointError
from .format.dtypes import torch_dtype

__all__ = ["BufferSpec", "DeviceCopies", "Layout", "StagingPool", "StagingSlot", "make_layout"]

_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; not in Python 3.11
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every context, not only the caller's


class Segment:
    """One anonymous shared-memory segment, mapped here."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = _anonymous_shm(size)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.base = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.pinned = False
        self.pin_asked = False  # a refused page-lock is not asked again
        self._pin_device: int | None = None

    def back(self) -> None:
        """Allocate and map every page now, in bulk, instead of one fault per page in the copy.

        Measured on 2 cores for 2 GiB of fresh memory: the first staging copy
        took 2.0-2.8 s faulting page by page, against 0.25 s to allocate (two
        segments at once) and about 0.5 s to map. It also turns running out of
        memory into an error here instead of a SIGBUS in the middle of a copy.
        """
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(self.fd, 0, self.size)
        with contextlib.suppress(OSError, ValueError):  # before Linux 5.14: the copy maps pages
            self._populate()

    def _populate(self) -> None:
        """Map every page here now.

        Through libc, which lets go of the GIL: ``mmap.madvise`` holds it for
        the whole call, so segments were mapped one after the other and the
        trainer's other threads (an overlapped save's training loop) stood still:
        about 0.2 s a GiB here.
        """
        c = libc()
        if c is None:  # pragma: no cover - no C library to call
            self.mm.madvise(_MADV_POPULATE_WRITE)
            return
        if c.madvise(ctypes.c_void_p(self.base.data_ptr()), ctypes.c_size_t(self.size), _MADV_POPULATE_WRITE):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def pin(self, device: int | None) -> None:
        """Page-lock for device-to-host copies, as seen by every device's context (portable).

        Registered from ``device``'s context: the calling thread's current device
        may be another (a new thread's is 0), and a call from there would create
        a context on that GPU, ~500 MB of it, from every rank of a node.
        """
        with _on_device(device):
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(self.base.data_ptr(), self.size, _HOST_REGISTER_PORTABLE)
        self.pinned = int(err) == 0
        self.pin_asked = True
        self._pin_device = device

    def close(self) -> None:
        if self.pinned:
            with _on_device(self._pin_device):  # not from a context the process does not use
                torch.cuda.cudart().cudaHostUnregister(self.base.data_ptr())
            self.pinned = False
        del self.base
        self.mm.close()
        os.close(self.fd)


def _on_device(device: int | None) -> contextlib.AbstractContextManager[Any]:
    return torch.cuda.device(device) if device is not None else contextlib.nullcontext()


def _pin_all(segments: list[Segment], device: int | None) -> None:
    """Page-lock each segment not asked yet; a refused one stays unpinned (its copies are only slower)."""
    for seg in segments:
        if not seg.pin_asked:
            seg.pin(device)


def _back_all(segments: list[Segment], layout: Layout) -> None:
    """Back every segment, several at once (each file's allocation is serial in the kernel)."""
    try:
        if len(segments) == 1:
            segments[0].back()
            return
        workers = max(1, min(len(segments), os.cpu_count() or 1, 4))
        with ThreadPoolExecutor(workers, thread_name_prefix="async_ckpt-stage-alloc") as pool:
            list(pool.map(Segment.back, segments))
    except OSError as exc:
        raise CheckpointError(
            f"cannot allocate {layout.nbytes / 2**30:.2f} GiB of shared memory to stage "
            f"{len(layout.specs)} tensors ({exc.strerror or exc}); free host memory, or lower "
            "max_in_flight so fewer copies of the state dict are held"
        ) from exc


def _anonymous_shm(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("async_ckpt-staging", os.MFD_CLOEXEC)
    else:  # pragma: no cover - non-Linux: an unlinked file in shared memory or tmp
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="async_ckpt-", dir=shm)
        os.unlink(path)
    os.ftruncate(fd, size)
    return fd


class DeviceCopies:
    """The side streams one save copies CUDA tensors on, each ordered after the caller's work.

    Made on the thread that calls ``save``: the events recorded here on that
    thread's current stream of each device are what the copies wait for. The copy
    itself runs later, perhaps on the staging thread, whose current stream is the
    default one: waiting for *that* would miss work the caller queued on a stream
    of its own, and would wait for work it queued after the save. Each device's
    tensors are copied on a stream of that device: a copy from ``cuda:1`` issued
    under a ``cuda:0`` stream runs on ``cuda:1``'s current stream, which an event
    on the ``cuda:0`` stream does not cover.
    """

    def __init__(self, streams: dict[int, Any], devices: tuple[int, ...]) -> None:
        self._streams = streams
        self._after: dict[int, Any] = {}
        for index in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(index))
            self._after[index] = event
        self._used: dict[int, Any] = {}

    @property
    def devices(self) -> tuple[int, ...]:
        """The devices whose tensors this save copies (the layout's)."""
        return tuple(self._after)

    def stream(self, device: torch.device) -> Any:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._used.get(index)
        if stream is not None:
            return stream
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        after = self._after.get(index)
        if after is not None:
            stream.wait_event(after)
        else:  # a device the layout did not list (not expected): all its queued work
            stream.wait_stream(torch.cuda.current_stream(index))
        self._used[index] = stream
        return stream

    def synchronize(self) -> None:
        """Block until every copy issued so far is done."""
        for stream in self._used.values():
            stream.synchronize()


@dataclass(eq=False)
class StagingSlot:
    slot_id: int
    layout: Layout
    segments: list[Segment]
    views: dict[Key, torch.Tensor] = field(default_factory=dict)
    busy: bool = False
    registered_with: int | None = None
    """pid of the worker that has these segments mapped, if any."""

    def __post_init__(self) -> None:
        for s in self.layout.specs:
            raw = self.segments[s.segment].base[s.offset : s.offset + s.nbytes]
            dtype = torch_dtype(s.dtype)
            self.views[s.key] = (
                raw.view(dtype).view(s.shape) if s.nbytes else torch.empty(s.shape, dtype=dtype)
            )
        self._keys = tuple(self.views)
        self._dsts = list(self.views.values())

    @property
    def pinned(self) -> bool:
        return bool(self.segments) and all(seg.pinned for seg in self.segments)

    def copy_in(
        self, tensors: Mapping[Key, torch.Tensor], d2h: DeviceCopies | None = None, on_half: Any = None
    ) -> DeviceCopies | None:
        """Copy every tensor into its buffer; returns what to ``synchronize()`` on, or None.

        Device tensors are copied on ``d2h``'s side stream of their own device
        (non_blocking into pinned memory), after the work the saving caller had
        queued when it called, so forward/backward work queued later overlaps the copy.
        """
        if d2h is None:
            self._copy_host(tensors, on_half)
            return None
        try:
            self._copy_on(d2h, tensors, on_half)
        except RuntimeError as exc:
            raise _copy_error(tensors, [self.views[k] for k in tensors], exc) from exc
        return d2h

    def _copy_on(self, d2h: DeviceCopies, tensors: Mapping[Key, torch.Tensor], on_half: Any) -> None:
        half = len(tensors) // 2
        non_blocking = self.pinned  # read once, not per tensor (a property over every segment)
        with torch.no_grad():
            for i, (key, src) in enumerate(tensors.items()):
                if on_half is not None and i == half:
                    on_half()
                dst = self.views[key]
                if dst.numel() == 0:
                    continue
                if src.device.type == "cuda":
                    stream = d2h.stream(src.device)
                    with torch.cuda.stream(stream):
                        dst.copy_(src, non_blocking=non_blocking)
                    src.record_stream(stream)
                else:
                    dst.copy_(src)

    def _copy_host(self, tensors: Mapping[Key, torch.Tensor], on_half: Any) -> None:
        # The loop runs once per tensor inside the training loop's stall: with
        # thousands of small tensors, a dict lookup and checks per tensor add up.
        srcs = list(tensors.values())
        dsts = self._dsts if tuple(tensors) == self._keys else [self.views[k] for k in tensors]
        half = len(srcs) // 2
        try:
            with torch.no_grad():
                for dst, src in zip(dsts[:half], srcs[:half], strict=True):
                    dst.copy_(src)
                if on_half is not None:
                    on_half()
                for dst, src in zip(dsts[half:], srcs[half:], strict=True):
                    dst.copy_(src)
        except RuntimeError as exc:
            raise _copy_error(tensors, dsts, exc) from exc

    def carve(self, specs: tuple[BufferSpec, ...]) -> StagingSlot:
        """This slot's memory laid out as ``specs`` (one round of a budgeted save).

        The view shares the segments and must never be closed: the pool owns them.
        """
        return StagingSlot(
            self.slot_id, Layout(specs, self.layout.segment_sizes, self.layout.key), self.segments
        )

    def close(self) -> None:
        self._dsts.clear()
        self.views.clear()
        for seg in self.segments:
            seg.close()
        self.segments.clear()


def pin_under(pin: bool | None, cuda_devices: tuple[int, ...]) -> tuple[bool, int | None]:
    """Whether to pin a slot for tensors on ``cuda_devices``, and from which device's context.

    ``pin=None`` (the default) pins only for CUDA tensors: a CPU state dict on a
    GPU machine gains nothing from page-locked memory, and registering it would
    create a CUDA context. The device is None (the calling thread's current
    one) for ``pin=True`` without CUDA tensors.
    """
    if pin is False or (pin is None and not cuda_devices):
        return False, None
    return True, (cuda_devices[0] if cuda_devices else None)


class StagingPool:
    """At most ``max_in_flight`` slots, across layouts; ``acquire`` blocks while all are busy."""

    def __init__(self, max_in_flight: int, *, pin: bool | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self.pin = pin
        """True: always pin; False: never; None: when the layout holds CUDA tensors (``pin_under``)."""
        self._slots: list[StagingSlot] = []
        self._cond = threading.Condition()
        self._next_id = 0
        self._closed = False
        self._owner = threading.get_ident()
        self.allocations = 0
        """How many slots were ever allocated (a steady state allocates none)."""
        self._evicted: list[int] = []

    def acquire(
        self, layout: Layout, timeout: float | None = None, cuda_devices: tuple[int, ...] = ()
    ) -> tuple[StagingSlot, float]:
        """A free slot for ``layout`` and the seconds spent waiting for another save to free one.

        ``cuda_devices``: where the tensors to stage live (``pin_under``).
        Allocating a new slot is not waiting: only time blocked on busy slots counts.
        """
        blocked = 0.0
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise CheckpointError("the staging pool is closed")
                slot = self._take(layout, cuda_devices)
                if slot is not None:
                    return slot, blocked
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"no staging buffer freed within {timeout:.0f}s: {self.max_in_flight} "
                        "save(s) still in flight"
                    )
                t0 = time.perf_counter()
                self._cond.wait(remaining)
                blocked += time.perf_counter() - t0

    def _take(self, layout: Layout, cuda_devices: tuple[int, ...]) -> StagingSlot | None:
        pin, under = pin_under(self.pin, cuda_devices)
        for slot in self._slots:
            if not slot.busy and slot.layout.key == layout.key:
                if pin:  # it may have staged CPU tensors before: the layout key names no device
                    _pin_all(slot.segments, under)
                slot.busy = True
                return slot
        if len(self._slots) >= self.max_in_flight:
            stale = next((s for s in self._slots if not s.busy), None)
            if stale is None:
                return None
            self._slots.remove(stale)
            stale.close()
            if stale.registered_with is not None:
                self._evicted.append(stale.slot_id)
        segments: list[Segment] = []
        try:
            for size in layout.segment_sizes:
                segments.append(Segment(size))
            _back_all(segments, layout)
            if pin:
                _pin_all(segments, under)
        except BaseException:
            for seg in segments:
                seg.close()
            raise
        slot = StagingSlot(self._next_id, layout, segments, busy=True)
        self._next_id += 1
        self.allocations += 1
        self._slots.append(slot)
        return slot

    def take_evicted(self) -> list[int]:
        """Ids of slots freed here to make room for another layout since the last call.

        The worker still maps them (and holds their memory) until told to drop them.
        """
        with self._cond:
            out, self._evicted = self._evicted, []
            return out

    def release(self, slot: StagingSlot) -> None:
        """Give ``slot`` back; exactly once per ``acquire``.

        A second release could free the slot while another save, which took it
        in between, is still copying into it or being written from it.
        """
        with self._cond:
            if not slot.busy:
                raise RuntimeError(f"staging slot {slot.slot_id} released twice")
            slot.busy = False
            self._cond.notify_all()

    def held_bytes(self) -> int:
        """Shared memory the slots hold now (segments as allocated, alignment included)."""
        with self._cond:
            return sum(seg.size for slot in self._slots for seg in slot.segments)

    def slots(self) -> list[StagingSlot]:
        with self._cond:
            return list(self._slots)

    def interrupt(self) -> None:
        """Make every current and later ``acquire`` fail, freeing nothing (a copy may still run)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for slot in self._slots:
                slot.close()
            self._slots.clear()
            self._cond.notify_all()


def _copy_error(
    tensors: Mapping[Key, torch.Tensor], dsts: list[torch.Tensor], exc: RuntimeError
) -> CheckpointError:
    """The failed staging copy as an error naming the tensor whose shape no longer matches its buffer."""
    for (key, src), dst in zip(tensors.items(), dsts, strict=False):
        if src.shape != dst.shape:
            return CheckpointError(
                f"key '{key[0]}': the tensor is {tuple(src.shape)} now and was {tuple(dst.shape)} when the "
                f"save was called; change a tensor only once its save is staged (pending.staged) ({exc})"
            )
    return CheckpointError(f"staging copy failed: {exc}")
