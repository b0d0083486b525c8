"""Helpers shared by the benchmarks: a synthetic training state dict, page-cache eviction,
peak-RSS sampling, plain-text tables, and the progress log / cleanup every script uses.

Nothing here imports ``async_ckpt``, so a benchmark can time the library's import
separately and compare against other checkpointers on equal terms.
"""

from __future__ import annotations

import ctypes
import gc
import math
import mmap
import os
import random
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch

__all__ = [
    "write_batches",
    "tensor_views",
    "raw_write",
    "IOV_MAX",
    "IO_BYTES",
    "PeakRSS",
    "cache_then_evict",
    "cold_step",
    "evict_from_page_cache",
    "fmt_bytes",
    "iter_tensors",
    "log",
    "make_state_dict",
    "map_tensors",
    "median",
    "preallocated_like",
    "print_table",
    "quiesce",
    "release_free_memory",
    "reported_kib",
    "resident_bytes",
    "rm",
    "state_dict_bytes",
    "summarize",
]

# --------------------------------------------------------------------------- state dict

_LARGE_KINDS = (
    "attn.q_proj.weight",
    "attn.k_proj.weight",
    "attn.v_proj.weight",
    "attn.o_proj.weight",
    "mlp.up_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
)
_SMALL_KINDS = (
    "input_norm.weight",
    "input_norm.bias",
    "attn.q_proj.bias",
    "attn.k_proj.bias",
    "attn.v_proj.bias",
    "attn.o_proj.bias",
    "post_norm.weight",
    "post_norm.bias",
    "mlp.up_proj.bias",
    "mlp.down_proj.bias",
)
_SMALL_NUMEL = (256, 512, 1024, 2048, 4096, 8192)
_LARGE_COLS = (1024, 2048, 4096)


def make_state_dict(total_bytes: int, n_tensors: int, seed: int = 0) -> dict[str, Any]:
    """A model + Adam state dict of ``n_tensors`` tensors holding about ``total_bytes`` bytes.

    Shape of the result::

        {"model": {"embed.weight": T, "layers.0.attn.q_proj.weight": T, ...},
         "optim": {"state": {0: {"step": T0d, "exp_avg": T, "exp_avg_sq": T}, ...},
                   "param_groups": [{"lr": ..., "betas": (...), "params": [0, 1, ...]}, ...]},
         "step": 1000}

    Every parameter has Adam's three state tensors (``step`` is a 0-d float32 tensor,
    as ``torch.optim.Adam`` keeps it), so about a quarter of the tensors are
    parameters; ``n_tensors % 4`` extra model buffers (no optimizer state) make up
    the count exactly. One parameter in eight is a large matrix (embedding and
    head the largest) and holds nearly all the bytes; the rest are small vectors
    (norms, biases). About a fifth of the large parameters and a tenth of the small
    ones are bfloat16, with bfloat16 optimizer state like ``zeros_like(param)``
    gives; the rest float32. The last large matrix absorbs rounding, so the total
    is within one row of ``total_bytes``. Values are random (seeded; scaled slices
    of random pools at random offsets, which is 5x faster than drawing every value),
    so no page is a shared zero page and no copy can be skipped. Same seed, same
    state dict. A budget too small for the tensor count (under ~2 KiB a tensor) is
    overshot: every tensor keeps at least one element, every matrix one row.
    """
    if n_tensors < 4:
        raise ValueError("n_tensors must be at least 4 (one parameter and its Adam state)")
    if total_bytes <= 0:
        raise ValueError("total_bytes must be positive")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)

    n_params = n_tensors // 4
    n_extra = n_tensors - 4 * n_params
    n_large = max(1, n_params // 8)
    n_small = n_params - n_large
    n_layers = max(1, -(-(n_large - 2) // len(_LARGE_KINDS))) if n_large > 2 else 1

    # (layer sort key, name, dtype, shape-or-None (large: decided later), share)
    specs: list[dict[str, Any]] = []
    for i in range(n_large):
        if i == 0:
            name, layer, share = "embed.weight", -1, 4.0
        elif i == n_large - 1:
            name, layer, share = "lm_head.weight", n_layers, 4.0
        else:
            layer, kind = divmod(i - 1, len(_LARGE_KINDS))
            name, share = f"layers.{layer}.{_LARGE_KINDS[kind]}", rng.uniform(0.5, 1.5)
        dtype = torch.bfloat16 if i % 5 == 2 else torch.float32
        specs.append({"name": name, "layer": layer, "dtype": dtype, "large": True, "share": share})
    for j in range(n_small):
        layer, k = j % n_layers, j // n_layers
        kind = _SMALL_KINDS[k] if k < len(_SMALL_KINDS) else f"extra{k - len(_SMALL_KINDS)}.weight"
        dtype = torch.bfloat16 if j % 10 == 7 else torch.float32
        specs.append(
            {
                "name": f"layers.{layer}.{kind}",
                "layer": layer,
                "dtype": dtype,
                "large": False,
                "numel": rng.choice(_SMALL_NUMEL),
            }
        )

    # Small vectors: keep them under a tenth of the budget when the budget is tiny.
    small_bytes = sum(3 * s["numel"] * s["dtype"].itemsize for s in specs if not s["large"])
    if small_bytes > total_bytes // 10:
        scale = (total_bytes // 10) / small_bytes
        for s in specs:
            if not s["large"]:
                s["numel"] = max(1, int(s["numel"] * scale))
    small_bytes = sum(3 * s["numel"] * s["dtype"].itemsize for s in specs if not s["large"])
    fixed = small_bytes + 4 * n_params + 8 * n_extra  # + Adam step scalars + int64 buffers
    large_budget = max(0, total_bytes - fixed) / 3  # param, exp_avg, exp_avg_sq
    large = [s for s in specs if s["large"]]
    shares = sum(s["share"] for s in large)
    used = 0
    for idx, s in enumerate(large):
        cols = rng.choice(_LARGE_COLS)
        item = s["dtype"].itemsize
        if idx == len(large) - 1:
            want = max(0.0, (total_bytes - fixed) / 3 - used)
        else:
            want = large_budget * s["share"] / shares
        rows = max(1, round(want / (cols * item)))
        s["shape"] = (rows, cols)
        used += rows * cols * item
    for s in specs:
        if not s["large"]:
            s["shape"] = (s["numel"],)

    specs.sort(key=lambda s: (s["layer"], not s["large"]))
    model: dict[str, Any] = {}
    state: dict[int, dict[str, torch.Tensor]] = {}
    decay, no_decay = [], []
    pools = _RandomPools(gen, rng)
    for i, s in enumerate(specs):
        p = pools.fill(torch.empty(s["shape"], dtype=s["dtype"]), "normal", 0.02)
        model[s["name"]] = p
        state[i] = {
            "step": torch.tensor(float(1000)),
            "exp_avg": pools.fill(torch.empty_like(p), "normal", 1e-3),
            "exp_avg_sq": pools.fill(torch.empty_like(p), "uniform", 1e-6),
        }
        (decay if s["large"] else no_decay).append(i)
    for e in range(n_extra):
        model[f"buffers.{e}.num_batches_tracked"] = torch.tensor(1000 + e, dtype=torch.int64)

    common = {
        "lr": 3e-4,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
    }
    groups = [{**common, "weight_decay": 0.1, "params": decay}]
    if no_decay:
        groups.append({**common, "weight_decay": 0.0, "params": no_decay})
    return {"model": model, "optim": {"state": state, "param_groups": groups}, "step": 1000}


class _RandomPools:
    """Seeded random pools per (dtype, distribution); tensors are filled with scaled
    slices from random offsets. Drawing 2 GiB of fresh random numbers takes ~10 s on
    two cores; this takes well under 2 s and every page still holds distinct data."""

    _NUMEL = 16 << 20

    def __init__(self, gen: torch.Generator, rng: random.Random) -> None:
        self._gen = gen
        self._rng = rng
        self._pools: dict[tuple[torch.dtype, str], torch.Tensor] = {}

    def _pool(self, dtype: torch.dtype, dist: str) -> torch.Tensor:
        key = (dtype, dist)
        if key not in self._pools:
            t = torch.empty(self._NUMEL, dtype=dtype)
            self._pools[key] = (
                t.normal_(generator=self._gen) if dist == "normal" else t.uniform_(generator=self._gen)
            )
        return self._pools[key]

    def fill(self, t: torch.Tensor, dist: str, scale: float) -> torch.Tensor:
        src = self._pool(t.dtype, dist)
        flat = t.view(-1)
        pos, n = 0, flat.numel()
        while pos < n:
            off = self._rng.randrange(src.numel() - 1)
            k = min(n - pos, src.numel() - off)
            torch.mul(src[off : off + k], scale, out=flat[pos : pos + k])
            pos += k
        return t


def iter_tensors(node: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested dict/list/tuple, in traversal order."""
    if isinstance(node, torch.Tensor):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from iter_tensors(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from iter_tensors(v)


def state_dict_bytes(node: Any) -> int:
    return sum(t.numel() * t.element_size() for t in iter_tensors(node))


def map_tensors(node: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Same structure with ``fn`` applied to every tensor; other values kept as they are."""
    if isinstance(node, torch.Tensor):
        return fn(node)
    if isinstance(node, dict):
        return {k: map_tensors(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [map_tensors(v, fn) for v in node]
    if isinstance(node, tuple):
        return tuple(map_tensors(v, fn) for v in node)
    return node


def preallocated_like(node: Any) -> Any:
    """Same structure; every tensor a fresh zero-filled one (pages touched, so no
    first-touch page faults land in a timed region); other values copied as-is."""
    return map_tensors(node, lambda t: torch.empty_like(t).zero_())


# --------------------------------------------------------------------------- raw write (the save limit)

IO_BYTES = 64 << 20  # one write/read call moves at most this much
IOV_MAX = 1024


def tensor_views(tensors: list[torch.Tensor]) -> list[memoryview]:
    """The raw bytes of every non-empty tensor, no copies (CPU tensors)."""
    out = []
    for t in tensors:
        if t.numel():
            out.append(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B"))
    return out


def write_batches(views: list[memoryview]) -> list[list[memoryview]]:
    """Group the tensors' bytes into writev calls of at most IO_BYTES and IOV_MAX buffers."""
    batches: list[list[memoryview]] = []
    cur: list[memoryview] = []
    size = 0
    for v in views:
        for pos in range(0, len(v), IO_BYTES):
            piece = v[pos : pos + IO_BYTES]
            if cur and (size + len(piece) > IO_BYTES or len(cur) >= IOV_MAX):
                batches.append(cur)
                cur, size = [], 0
            cur.append(piece)
            size += len(piece)
    if cur:
        batches.append(cur)
    return batches


def raw_write(
    path: str, batches: list[list[memoryview]], phases: list[dict[str, float]] | None = None
) -> int:
    """Write the batches to a new file and fsync it; ``phases`` gets the write/fsync split."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    try:
        for batch in batches:
            n = os.writev(fd, batch)
            want = sum(len(b) for b in batch)
            while n < want:  # partial writev: finish the batch with plain writes
                flat = memoryview(b"".join(batch))[n:]
                n += os.write(fd, flat)
            written += want
        t1 = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
    if phases is not None:
        phases.append({"write_s": t1 - t0, "fsync_s": time.perf_counter() - t1})
    return written


# --------------------------------------------------------------------------- page cache


def _files_under(path: str | os.PathLike[str]) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file())


def evict_from_page_cache(path: str | os.PathLike[str]) -> None:
    """Drop ``path`` (a file, or every file under a directory) from the page cache.

    Each file is fsynced first (DONTNEED skips dirty pages), then advised
    POSIX_FADV_DONTNEED. As root we also write 1 to /proc/sys/vm/drop_caches
    (clean page cache, system wide); failure there (a read-only /proc in a
    container) is ignored. Check the outcome with ``resident_bytes``.
    """
    for f in _files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if os.geteuid() == 0:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as fh:
                fh.write("1")
        except OSError:
            pass


_PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/reported_kib")
_REPORT_SETTLE_S = 2.5  # the kernel's 2 s reporting delay, plus the report itself


def cache_then_evict(path: str | os.PathLike[str], chunk: int = 64 << 20) -> None:
    """Read ``path`` (file or tree) fully into the page cache, then evict it.

    Every cold step goes through this, so every cold step starts from the same
    state. It matters on VMs whose freed memory goes back to the host (virtio-
    balloon free page reporting, as on the machine these figures come from):
    memory freed a moment ago is still backed, while memory already reported
    costs a host fault on its first touch. Without this, a cold read of a file
    that was just evicted fills the page cache with backed pages, while a cold
    read of a file that was never cached (ours: written with O_DIRECT) pays a
    host fault per page: measured at 2 GiB, 0.54 s against 2.4 s for one read.
    See ``reported_kib`` for the other half.
    """
    _read_through(path, chunk)
    evict_from_page_cache(path)


def _read_through(path: str | os.PathLike[str], chunk: int = 64 << 20) -> None:
    buf = bytearray(chunk)
    view = memoryview(buf)
    for f in _files_under(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass


def reported_kib() -> int | None:
    """KiB of free memory this VM has reported to its host so far; None without page reporting.

    The kernel reports free memory about 2 s after a large free (such as an
    eviction). A cold step during which this count moved had part of its page
    cache allocated from memory the host had taken back; the benchmarks run
    such a step again (``cold_step``) and say how often they had to.
    """
    try:
        return int(_PAGE_REPORTING.read_text())
    except (OSError, ValueError):
        return None


def cold_step(
    path: str | os.PathLike[str],
    run: Callable[[], float],
    *,
    attempts: int = 3,
    discard: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """``run()`` (it returns seconds) after ``cache_then_evict(path)``.

    A run counts as disturbed when the VM reported free memory between the
    eviction and the run's end.

    A run that free page reporting disturbed is thrown away (``discard`` drops
    what it recorded) and done again, ``attempts`` runs at most; the last run
    counts whatever happened. Before a redo we wait out the report that earlier
    frees armed, so the redo has the 2 s grace to itself. Returns (seconds, how
    many runs were disturbed).
    """
    disturbed = 0
    dt = 0.0
    for attempt in range(attempts):
        if attempt:
            time.sleep(_REPORT_SETTLE_S)
        _read_through(path)
        # From the eviction on: a report before the run starts takes the freed pages too.
        before = reported_kib()
        evict_from_page_cache(path)
        dt = run()
        if before is None or reported_kib() == before:
            break
        disturbed += 1
        if attempt + 1 < attempts and discard is not None:
            discard()
    return dt, disturbed


_libc: Any = None


def resident_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes of ``path`` (file or directory tree) now in the page cache, via mincore(2).

    Returns None where mincore is unavailable.
    """
    global _libc
    try:
        if _libc is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            _libc = libc
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    total = 0
    for f in _files_under(path):
        size = f.stat().st_size
        if size == 0:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                npages = -(-size // page)
                vec = (ctypes.c_ubyte * npages)()
                if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                total += sum(b & 1 for b in bytes(vec)) * page
            finally:
                _libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return total


# --------------------------------------------------------------------------- statistics


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def summarize(xs: Sequence[float]) -> dict[str, Any]:
    return {"times": list(xs), "min": min(xs), "median": median(xs), "max": max(xs)}


# --------------------------------------------------------------------------- memory


class PeakRSS:
    """Peak RSS of a process and all its descendants, sampled every ``interval`` seconds
    on a daemon thread while the ``with`` block runs.

    The descendant list is refreshed every ``refresh`` seconds (listing children scans
    /proc and costs ~1 ms, 20x a sample of known pids). ``baseline`` is the first
    sample, ``peak`` the largest, ``delta`` their difference: the extra memory the
    block needed.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.02, refresh: float = 0.25) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval
        self._refresh = refresh
        self._children: list[psutil.Process] = []
        self._listed = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = 0
        self.peak = 0

    def sample(self) -> int:
        now = time.monotonic()
        if now - self._listed >= self._refresh:
            try:
                self._children = self._proc.children(recursive=True)
            except psutil.Error:
                self._children = []
            self._listed = now
        total = self._proc.memory_info().rss
        for c in self._children:
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> PeakRSS:
        self._listed = 0.0
        self.baseline = self.peak = self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.sample())

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


def release_free_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``),
    so that memory a previous step freed neither hides nor inflates the next step's RSS."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- run hygiene


def log(msg: str, tag: str = "") -> None:
    """A progress line on stderr, ``[tag HH:MM:SS] msg``: stdout carries the report alone."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{tag} {stamp}] {msg}" if tag else f"[{stamp}] {msg}", file=sys.stderr, flush=True)


def quiesce() -> None:
    """Flush all dirty data (and pending deletes) so a timed step pays only for its own I/O."""
    os.sync()


def rm(path: str | os.PathLike[str]) -> None:
    """Remove a checkpoint directory or a file, and the hidden leftovers of an interrupted
    async_ckpt save beside it (``.<name>.*``), which would otherwise fill the disk."""
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()
    for sib in p.parent.glob(f".{p.name}.*"):
        shutil.rmtree(sib, ignore_errors=True)


# --------------------------------------------------------------------------- output


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0 B"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    k = min(len(units) - 1, max(0, int(math.log(abs(n), 1024))))
    v = n / 1024**k
    return f"{v:.0f} {units[k]}" if k == 0 else f"{v:.2f} {units[k]}"


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
    """Print rows as an aligned text table: first column left-aligned, others right."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        pairs = enumerate(zip(r, widths, strict=True))
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)
        return "  ".join(padded)

    if title:
        print(title)
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))
