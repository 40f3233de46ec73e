"""What the commands share: the app, consoles, the store argument, slices, output."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import pickle
import sys
import warnings
from collections.abc import Iterator, Sequence
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
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, soft_wrap=True)
out = Console() if sys.stdout.isatty() else Console(width=160, soft_wrap=True)  # pipes: no wrap

STORE = typer.Argument(
    ...,
    envvar="GEOMSTORE_STORE",
    metavar="STORE",
    help="The store: a directory or a .duckdb file made by geomstore init, postgres:DSN, or "
    "the http(s):// URL of a geomstore serve (token in $GEOMSTORE_TOKEN) "
    "(default: $GEOMSTORE_STORE).",
)
NEW_STORE = typer.Argument(
    ...,
    envvar="GEOMSTORE_STORE",
    metavar="STORE",
    help="The store: a directory (created if missing), a .duckdb file, or postgres:DSN "
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


def shown(target: str) -> str:
    """A store's target as the CLI prints it: a catalog DSN's password masked."""
    from geomstore.store.sqlutil import _mask_password

    return _mask_password(str(target))


def as_arg(target: str) -> str:
    """A store's target as a command to paste (quoted when it has spaces, password masked)."""
    import shlex

    return shlex.quote(shown(target))


def require_store(target: str) -> None:
    """Refuse a local path that holds no store: only init, compute, submit, watch and demo
    create one, so that a mistyped path is an error rather than a new empty store."""
    from geomstore.errors import StoreError
    from geomstore.store.store import CATALOG

    if target.startswith(("http://", "https://", "postgres:", "postgresql://")):
        return  # the catalog's server answers for these
    path = Path(target)
    if path.is_file() if path.suffix == ".duckdb" else (path / CATALOG).is_file():
        return
    if path.is_file():
        raise StoreError(
            f"{target} is a file but not a store (a store is a directory or a .duckdb file); "
            "give the store's path, or make a new one elsewhere with `geomstore init PATH`."
        )
    if path.is_dir() and any(path.iterdir()):
        raise StoreError(
            f"{target} is a folder with files but no store in it (no {CATALOG}); give the "
            "store's path, or make a new one elsewhere with `geomstore init NEW_FOLDER`."
        )
    raise StoreError(f"no store at {target}; create one with `geomstore init {target}`.")


def open_store(target: str, *, read_only: bool = False, create: bool = False) -> Any:
    """Open the store named on the command line; its data path (where the Parquet files
    live: a shared folder or s3://bucket/prefix/) comes from $GEOMSTORE_DATA_PATH.

    Only with ``create`` may a local path that holds no store become a new one.
    """
    import os

    import geomstore

    if not create:
        require_store(target)
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

            with warnings.catch_warnings():  # torch's note on pickle protocols is noise here
                warnings.simplefilter("ignore", UserWarning)
                arr = torch.load(path, map_location="cpu", weights_only=True).numpy()
        else:
            raise GeomstoreError(f"slice file {path}: expected .npy, .npz or .pt.")
    except (ValueError, OSError, RuntimeError, AttributeError, EOFError, pickle.PickleError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else "the file ends early"
        if isinstance(exc, pickle.PickleError):
            why = "not a tensor file that torch.load(weights_only=True) reads"
        raise GeomstoreError(
            f"cannot read three inputs from {path}: {why}; expected 3 inputs stacked, saved "
            "with torch.save (.pt), np.save (.npy) or np.savez (.npz)."
        ) from exc
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
    out_ = given_slices(box, through, named, margin)
    return out_ + [store.load_slice(n) for n in named]


def given_slices(
    box: Sequence[str], through: Sequence[Path], named: Sequence[str], margin: float
) -> list[Slice]:
    """The slices of ``--box`` and ``--through``, checked before any store is opened (or
    made); raises when no slice at all is given."""
    out_: list[Slice] = [parse_box(b) for b in box]
    for f in through:
        a, b, c = _three_inputs(Path(f))
        out_.append(Slice.through(a, b, c, margin=margin, name=Path(f).stem))
    if not out_ and not named:
        raise GeomstoreError(
            "give a slice: --box x0,y0,x1,y1 (2-input models), --through FILE (three inputs) "
            "or --slice NAME (stored)."
        )
    return out_


@contextlib.contextmanager
def store_with_slices(
    target: str, box: Sequence[str], through: Sequence[Path], named: Sequence[str], margin: float
) -> Iterator[tuple[Any, list[Slice]]]:
    """The store (made when new) and the slices given: a bad slice argument, or a stored
    slice's name given for a path that holds no store, fails before anything is made."""
    given = given_slices(box, through, named, margin)
    if named:
        require_store(target)  # a new store holds no slice to name
    with open_store(target, create=True) as st:
        yield st, given + [st.load_slice(n) for n in named]


def metrics_columns(table: pa.Table, column: str = "metrics") -> pa.Table:
    """``table`` with its JSON ``metrics`` column spread into one float column per metric
    key (``accuracy``, ...; null where a checkpoint has no such metric), in first-seen order.
    A key that is already a column's name becomes ``metric_KEY``."""
    if column not in table.column_names:
        return table
    rows = [json.loads(m) if m else {} for m in table.column(column).to_pylist()]
    table = table.drop_columns([column])
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for k in keys:
        name = f"metric_{k}" if k in table.column_names else k
        values = [r.get(k) for r in rows]
        typed = pa.float64() if all(isinstance(v, int | float | None) for v in values) else None
        if typed is None:
            values = [None if v is None else json.dumps(v) for v in values]
        table = table.append_column(name, pa.array(values, type=typed or pa.string()))
    return table


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


_BY_SUFFIX = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def emit(
    table: pa.Table,
    fmt: str = "table",
    output: Path | None = None,
    *,
    title: str | None = None,
    truncated: bool = False,
) -> None:
    """Print or write a result as an aligned table, CSV, JSON (lines) or Parquet.

    An ``--output`` file named ``.csv``, ``.json``/``.jsonl`` or ``.parquet`` takes that
    format unless ``--format`` names another one than the default table.
    """
    fmt = fmt.lower()
    if fmt == "table" and output is not None:
        fmt = _BY_SUFFIX.get(Path(output).suffix.lower(), fmt)
    if fmt == "parquet":
        if output is None:
            raise GeomstoreError("--format parquet writes a file: add --output FILE.parquet")
        import pyarrow.parquet as pq

        with _writing(output):
            pq.write_table(table, output)
        err.print(f"wrote {table.num_rows} rows to {output}")
        return
    if fmt == "table":
        t = Table(title=title, show_lines=False)
        for name in table.column_names:
            t.add_column(name, overflow="fold")
        for r in table.to_pylist():
            t.add_row(*(_cell(v) for v in r.values()))
        if output is None:
            out.print(t)
        else:
            with _writing(output), open(output, "w") as f:
                Console(file=f, width=200).print(t)
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")  # not the csv module's CRLF
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


@contextlib.contextmanager
def _writing(output: Path) -> Iterator[None]:
    """An output file that cannot be written is the user's error, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise GeomstoreError(
            f"cannot write {output}: {exc.strerror or exc}; check --output's folder exists."
        ) from exc


def _write_text(text: str, output: Path | None) -> None:
    if output is None:
        typer.echo(text, nl=False)
    else:
        with _writing(output):
            Path(output).write_text(text)
        err.print(f"wrote {output}")
