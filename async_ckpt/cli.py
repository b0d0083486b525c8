"""The ``async-ckpt`` command line: ls, inspect, verify, convert, gc. See docs/cli.md.

Every command reads through the library (metadata parsing, verified region
reads); none of them parses the on-disk format itself. Errors end as one red
``error: ...`` line and exit status 2, or a traceback with ``--debug``.
"""

from __future__ import annotations

import argparse
import math
import os
import reprlib
import sys
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ._version import __version__
from .cli_ls import cmd_gc, cmd_ls
from .cli_output import human, say
from .convert import open_input, to_safetensors, to_torch
from .convert_ckpt import to_async_ckpt
from .errors import CheckpointError, CorruptCheckpointError
from .format.dtypes import dtype_name
from .format.metadata import Metadata
from .format.values import PickleRefusedError, decode_value
from .interop import dcp_unsupported, is_dcp_checkpoint, read_dcp_metadata
from .load_flow import read_checkpoint_metadata
from .storage import detect_storage
from .verify import verify_checkpoint

__all__ = ["main"]

_MiB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 verification failed, 2 error)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = 200  # piped or captured: do not fold names into an 80-column table
    try:
        status: int = args.run(args, out, err)
        return status
    except KeyboardInterrupt:
        say(err, "interrupted", "red")
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: one line and exit 2, or --debug
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        say(err, f"error: {message}", "bold red")
        return 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="async-ckpt", description="Inspect, verify, convert and clean async_ckpt checkpoints."
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"async-ckpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ls", parents=[common], help="list the checkpoints under a root")
    p.add_argument("root", metavar="ROOT")
    p.set_defaults(run=cmd_ls)

    p = sub.add_parser("inspect", parents=[common], help="show a checkpoint's tensors and values")
    p.add_argument("ckpt", metavar="CKPT")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("verify", parents=[common], help="check every checksum; exit 1 on any problem")
    p.add_argument("ckpt", metavar="CKPT")
    p.set_defaults(run=_cmd_verify)

    p = sub.add_parser(
        "convert",
        parents=[common],
        help="write one consolidated file of full tensors, or a DCP checkpoint as ours",
        description=(
            "CKPT is an async_ckpt or a torch.distributed.checkpoint (DCP) checkpoint. "
            "--to safetensors streams full tensors in slabs of at most --slab-mb MiB (one reused "
            "buffer; reads add at most two checksum blocks per saved piece a slab touches) and "
            "skips non-tensor values. --to torch builds the whole nested state dict in memory "
            "and torch.save()s it (loadable with torch.load(weights_only=True)). --to async_ckpt "
            "(DCP input only) streams every chunk in slabs of at most --slab-mb MiB into a "
            "checksummed async_ckpt checkpoint at OUT (a directory or storage URL)."
        ),
    )
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("out", metavar="OUT", help="output file (local path); a checkpoint for --to async_ckpt")
    p.add_argument(
        "--to", choices=["safetensors", "torch", "async_ckpt"], required=True, help="output format"
    )
    p.add_argument("--slab-mb", type=float, default=256.0, help="read buffer size in MiB (default 256)")
    p.add_argument("--rank", type=int, default=None, help="take per-rank entries from this rank's copy")
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser(
        "gc",
        parents=[common],
        help="remove leftovers of interrupted saves (never while a job is saving to ROOT)",
    )
    p.add_argument("root", metavar="ROOT")
    p.set_defaults(run=cmd_gc)
    return parser


# ------------------------------------------------------------------ helpers


def _open_any(ckpt: str) -> tuple[str, Metadata, bool]:
    """``(location, metadata, is_dcp)``: ours, or a torch.distributed.checkpoint's translated."""
    backend, location = detect_storage(ckpt)
    try:
        return location, read_checkpoint_metadata(backend, location), False
    except CheckpointError as exc:
        if isinstance(exc, CorruptCheckpointError) or not is_dcp_checkpoint(backend, location):
            raise
        return location, read_dcp_metadata(backend, location), True


def _progress(err: Console, label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
    )


# ------------------------------------------------------------------- inspect


def _cmd_inspect(args: argparse.Namespace, out: Console, err: Console) -> int:
    location, md, is_dcp = _open_any(args.ckpt)
    total = sum(f.size for f in md.files.values())
    kind = f"format version {md.version}"
    if is_dcp:  # its "files" are its tensor chunks, sized as raw bytes
        kind = "a torch.distributed.checkpoint (DCP) checkpoint (no checksums)"
    say(
        out,
        f"{location}: {kind}, saved by {md.world_size} rank(s), "
        f"{len(md.tensors)} tensor(s) and {len(md.values)} value(s) in {len(md.files)} file(s), "
        f"{human(total)}",
        "bold",
    )
    if md.tensors:
        table = Table(show_edge=False, title="tensors", title_justify="left")
        table.add_column("key", overflow="fold")
        table.add_column("dtype")
        table.add_column("shape")
        table.add_column("chunks", justify="right", no_wrap=True)
        table.add_column("bytes", justify="right", no_wrap=True)
        table.add_column("file(s)", overflow="fold")
        for fqn, rec in md.tensors.items():
            files = sorted({c.file for c in rec.chunks})
            shown = files[0] + (f" (+{len(files) - 1})" if len(files) > 1 else "") if files else "-"
            chunks = f"{len(rec.chunks)} (per rank)" if rec.per_rank else str(len(rec.chunks))
            table.add_row(
                fqn,
                dtype_name(rec.dtype),
                str(tuple(rec.shape)),
                chunks,
                human(sum(c.byte_length for c in rec.chunks)),
                shown,
            )
        out.print(table)
    if md.values:
        table = Table(show_edge=False, title="values", title_justify="left")
        table.add_column("key", overflow="fold")
        table.add_column("value", overflow="fold")
        for fqn, value in md.values.items():
            if value.per_rank is None:
                shown = _short(value.value, fqn)
            else:
                shown = "per rank: " + ", ".join(_short(v, fqn) for v in value.per_rank)
            table.add_row(fqn, shown)
        out.print(table)
    return 0


_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlong = 40


def _short(encoded: Any, fqn: str) -> str:
    if isinstance(encoded, dict) and encoded.get("$absent") is True:
        return "-"
    try:
        value = decode_value(encoded, fqn=fqn, allow_pickle=False)
    except PickleRefusedError:
        return "<pickled>"
    try:
        return _repr.repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits: no decimal form to show
        return f"<int of about {math.floor(math.log10(abs(value))) + 1} digits>"


# -------------------------------------------------------------------- verify


def _cmd_verify(args: argparse.Namespace, out: Console, err: Console) -> int:
    backend, location = detect_storage(args.ckpt)
    try:
        total: int | None = sum(f.size for f in read_checkpoint_metadata(backend, location).files.values())
    except CheckpointError as exc:
        if not isinstance(exc, CorruptCheckpointError) and is_dcp_checkpoint(backend, location):
            raise dcp_unsupported(
                location, "async-ckpt verify", why="DCP stores no checksums, so there is nothing to verify"
            ) from None
        total = None  # verify_checkpoint reports it
    with _progress(err, "verifying") as progress:
        task = progress.add_task("verify", total=total)
        report = verify_checkpoint(location, storage=backend, progress=lambda n: progress.advance(task, n))
        if total is not None:
            progress.update(task, completed=total)
    if report.ok:
        say(
            out,
            f"ok: {location}: {report.files_checked} file(s), {human(report.bytes_checked)} verified",
            "green",
        )
        return 0
    say(out, f"FAILED: {location}: {len(report.problems)} problem(s)", "bold red")
    for problem in report.problems:
        say(out, f"  {problem}", "red")
    return 1


# ------------------------------------------------------------------- convert


def _cmd_convert(args: argparse.Namespace, out: Console, err: Console) -> int:
    if not args.slab_mb > 0:
        raise ValueError("--slab-mb must be positive")
    backend, location = detect_storage(args.ckpt)

    def warn(text: str) -> None:
        say(err, text, "yellow" if text.startswith("warning") else "")

    with open_input(backend, location) as (md, dcp):
        if args.to == "async_ckpt":
            out_backend, out_location = detect_storage(args.out)
            with _progress(err, "converting") as progress:
                task = progress.add_task("convert", total=None)
                summary = to_async_ckpt(
                    backend,
                    location,
                    md,
                    dcp,
                    out_backend,
                    out_location,
                    slab_bytes=int(args.slab_mb * _MiB),
                    warn=warn,
                    progress=lambda n, total: progress.update(task, advance=n, total=total),
                )
            say(out, f"wrote {out_location}: {summary}", "green")
            return 0
        target = Path(args.out)
        _make_parent(target)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            if args.to == "safetensors":
                with _progress(err, "converting") as progress:
                    task = progress.add_task("convert", total=None)

                    def tick(n: int, total: int) -> None:
                        progress.update(task, advance=n, total=total)

                    summary = to_safetensors(
                        backend,
                        location,
                        md,
                        tmp,
                        rank=args.rank,
                        slab_bytes=int(args.slab_mb * _MiB),
                        warn=warn,
                        progress=tick,
                        dcp=dcp,
                    )
            else:
                summary = to_torch(backend, location, md, tmp, rank=args.rank, warn=warn, dcp=dcp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    say(out, f"wrote {target}: {summary}", "green")
    return 0


def _make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (target.parent, *target.parent.parents) if p.is_file()), None)
        why = f"{blocker} is a file, not a directory" if blocker is not None else str(exc)
        raise CheckpointError(f"cannot create the output directory {target.parent}: {why}") from exc
