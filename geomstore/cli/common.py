"""What the commands share: the app, consoles, the store argument, slices, output."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from geomstore.errors import GeomstoreError
from geomstore.slice import Slice

app = typer.Typer(
    help="Exact linear-region geometry of piecewise-linear networks, stored for SQL.\n\n"
    "Start with: geomstore demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err = Console(stderr=True)
out = Console() if sys.stdout.isatty() else Console(width=160)  # no wrapping into pipes

STORE = typer.Argument(
    ...,
    envvar="GEOMSTORE_STORE",
    metavar="STORE",
    help="The store: a directory (created if missing), a .duckdb file, postgres:DSN, or the "
    "http(s):// URL of a geomstore serve (token in $GEOMSTORE_TOKEN) "
    "(default: $GEOMSTORE_STORE).",
)
BOX = typer.Option([], "--box", help="A box slice of a 2-input model: x0,y0,x1,y1 (repeatable).")
THROUGH = typer.Option(
    [],
    "--through",
    metavar="FILE",
    help="A slice through three inputs in a file (.npy/.npz/.pt holding 3 inputs; repeatable).",
)
NAMED = typer.Option(
    [], "--slice", metavar="NAME", help="A slice stored in the store, by name (repeatable)."
)
MARGIN = typer.Option(0.2, help="With --through: grow the triangle's bounding box by this.")


def open_store(target: str, *, read_only: bool = False) -> Any:
    """Open the store named on the command line; its data path (where the Parquet files
    live: a shared folder or s3://bucket/prefix/) comes from $GEOMSTORE_DATA_PATH."""
    import os

    import geomstore

    if target.startswith(("http://", "https://")):  # a served store, read through the client
        if not read_only:
            raise GeomstoreError(
                f"{target} is a geomstore service: it answers queries only; write to the "
                "store on its own machine (or submit jobs with geomstore.connect(...).submit)."
            )
        return geomstore.connect(target, token=os.environ.get("GEOMSTORE_TOKEN"))
    if target.startswith(("postgres:", "postgresql://")):
        data = os.environ.get("GEOMSTORE_DATA_PATH")
        if not data:
            raise GeomstoreError(
                "a PostgreSQL catalog needs the folder of its data files: set "
                "GEOMSTORE_DATA_PATH=/shared/path (the same on every host)."
            )
        return geomstore.open(target, read_only=read_only, data_path=data)
    # used or refused, never ignored: a directory store records its data path (the
    # variable must then agree with it); a .duckdb file has none and refuses one
    data = os.environ.get("GEOMSTORE_DATA_PATH") or None
    return geomstore.open(target, read_only=read_only, data_path=data)


def progress() -> Progress:
    """A rich progress bar on stderr (silent when stderr is not a terminal)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal,  # no bar frames in logs and pipes
    )


def _three_inputs(path: Path) -> np.ndarray:
    if not path.is_file():
        raise GeomstoreError(f"slice file {path} does not exist.")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                arr = z["x"] if "x" in keys else np.stack([z[k] for k in keys[:3]])
        elif path.suffix in (".pt", ".pth"):
            import torch

            arr = torch.load(path, map_location="cpu", weights_only=True).numpy()
        else:
            raise GeomstoreError(f"slice file {path}: expected .npy, .npz or .pt.")
    except (ValueError, OSError, RuntimeError, AttributeError) as exc:
        raise GeomstoreError(f"cannot read three inputs from {path}: {exc}") from None
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim < 2 or arr.shape[0] != 3:
        raise GeomstoreError(
            f"{path} holds an array of shape {arr.shape}; expected 3 inputs stacked: (3, ...)."
        )
    return arr


def parse_box(text: str) -> Slice:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise GeomstoreError(
            f"--box {text!r}: give four numbers x0,y0,x1,y1, e.g. --box=-1,-1,1,1"
        ) from None
    return Slice.box((x0, y0), (x1, y1), name=f"box({text})")


def slices_from(
    store: Any, box: Sequence[str], through: Sequence[Path], named: Sequence[str], margin: float
) -> list[Slice]:
    """The slices the user named on the command line."""
    out_: list[Slice] = [parse_box(b) for b in box]
    for f in through:
        a, b, c = _three_inputs(Path(f))
        out_.append(Slice.through(a, b, c, margin=margin, name=Path(f).stem))
    out_ += [store.load_slice(n) for n in named]
    if not out_:
        raise GeomstoreError(
            "give a slice: --box x0,y0,x1,y1 (2-input models), --through FILE (three inputs) "
            "or --slice NAME (stored)."
        )
    return out_


def _cell(v: Any) -> str:
    import datetime as dt

    if v is None:
        return ""
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    if isinstance(v, list):
        return "[" + ", ".join(_cell(x) for x in v[:4]) + (", ...]" if len(v) > 4 else "]")
    return str(v)


def _plain(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    for r in rows:
        for k, v in r.items():
            if isinstance(v, bytes):
                r[k] = v.hex()
            elif not isinstance(v, str | int | float | bool | list | dict | type(None)):
                r[k] = str(v)
    return rows


def emit(
    table: pa.Table,
    fmt: str = "table",
    output: Path | None = None,
    *,
    title: str | None = None,
    truncated: bool = False,
) -> None:
    """Print or write a result as an aligned table, CSV, JSON (lines) or Parquet."""
    fmt = fmt.lower()
    if fmt == "parquet":
        if output is None:
            raise GeomstoreError("--format parquet writes a file: add --output FILE.parquet")
        import pyarrow.parquet as pq

        pq.write_table(table, output)
        err.print(f"wrote {table.num_rows} rows to {output}")
        return
    if fmt == "table":
        t = Table(title=title, show_lines=False)
        for name in table.column_names:
            t.add_column(name, overflow="fold")
        for r in table.to_pylist():
            t.add_row(*(_cell(v) for v in r.values()))
        target = out if output is None else Console(file=open(output, "w"), width=200)  # noqa: SIM115
        target.print(t)
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(table.column_names)
        for r in _plain(table):
            w.writerow(json.dumps(v) if isinstance(v, list | dict) else v for v in r.values())
        _write_text(buf.getvalue(), output)
    elif fmt == "json":
        text = "".join(json.dumps(r) + "\n" for r in _plain(table))
        _write_text(text, output)
    else:
        raise GeomstoreError(f"--format must be table, csv, json or parquet; got {fmt!r}.")
    if truncated:
        err.print("(result truncated at --max-rows rows)")


def _write_text(text: str, output: Path | None) -> None:
    if output is None:
        typer.echo(text, nl=False)
    else:
        Path(output).write_text(text)
        err.print(f"wrote {output}")
