"""The worker's share of the machine: it should take only CPU and disk time training leaves over.

Three knobs, each applied to every thread of the worker (on Linux niceness,
scheduling policy and I/O priority are per thread; threads started later
inherit them from the thread that starts them):

* niceness (``worker_nice``), everywhere;
* the ``SCHED_IDLE`` policy, where the OS has it: a thread that runs only
  when a core has nothing else to run (a weight of 3 against nice 0's 1024,
  where nice 15 still has 36);
* the idle I/O class (``ioprio_set``, Linux): its reads and writes are served
  when no other process's are waiting, by the I/O schedulers that honour
  classes (BFQ; ``none`` and ``mq-deadline`` ignore them).

Each is skipped silently where refused: a slower save is better than none.
"""

from __future__ import annotations

import contextlib
import os
import platform

from .._libc import libc as _libc

__all__ = ["IOPRIO_CLASS_IDLE", "ioprio_class", "lower_priority"]

IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_WHO_PROCESS = 1  # with a thread id, that thread

# (ioprio_set, ioprio_get) syscall numbers; the generic table (aarch64, riscv64, loongarch) is 30/31.
_SYSCALLS = {
    "x86_64": (251, 252),
    "i386": (289, 290),
    "i686": (289, 290),
    "ppc64le": (273, 274),
    "ppc64": (273, 274),
    "s390x": (282, 283),
    "aarch64": (30, 31),
    "arm64": (30, 31),
    "riscv64": (30, 31),
    "loongarch64": (30, 31),
}


def lower_priority(nice: int, idle: bool) -> None:
    """Nice every thread of this process by ``nice``; with ``idle``, SCHED_IDLE and idle I/O too."""
    for tid in _threads():
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        if idle:
            _sched_idle(tid)
            _ioprio_idle(tid)


def ioprio_class(tid: int) -> int | None:
    """The I/O priority class of thread or process ``tid`` (0: none set), None where unknown."""
    calls = _syscall_numbers()
    libc = _libc()
    if calls is None or libc is None:
        return None
    value = libc.syscall(calls[1], _IOPRIO_WHO_PROCESS, tid)
    return None if value < 0 else int(value) >> _IOPRIO_CLASS_SHIFT


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: the calling thread, the only one there is this early
        return [0]


def _sched_idle(tid: int) -> None:
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(tid, policy, os.sched_param(0))


def _ioprio_idle(tid: int) -> None:
    calls = _syscall_numbers()
    libc = _libc()
    if calls is None or libc is None:
        return
    libc.syscall(calls[0], _IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT)


def _syscall_numbers() -> tuple[int, int] | None:
    if platform.system() != "Linux":
        return None
    return _SYSCALLS.get(platform.machine())
