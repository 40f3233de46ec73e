"""Commands on the store itself: init, migrate, sql, partitions, export, add-points."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import typer

from geomstore.cli.common import (
    BOX,
    MARGIN,
    NAMED,
    NEW_STORE,
    STORE,
    THROUGH,
    app,
    emit,
    err,
    open_store,
    out,
    require_store,
    shown,
    store_with_slices,
)
from geomstore.errors import GeomstoreError


@app.command()
def init(store: str = NEW_STORE) -> None:
    """Create a store (a directory, or a .duckdb file), or check an existing one.

    Example: geomstore init runs/moons
    """
    with open_store(store, create=True) as st:
        out.print(f"store {shown(store)}: {st.kind}, schema version {st.schema_version}")


@app.command()
def migrate(
    store: str = STORE,
    dry_run: bool = typer.Option(False, "--dry-run", help="List pending migrations only."),
) -> None:
    """Upgrade a store's schema to this geomstore's (opening for writing does it too).

    Example: geomstore migrate runs/moons --dry-run
    """
    from geomstore.store.schema import apply_migrations, current_version, migrations
    from geomstore.store.sqlutil import _retry
    from geomstore.store.store import Store

    require_store(store)
    st = Store(store, upgrade=False)
    try:
        have = current_version(st.con)
        pending = [m for m in migrations() if m.version > have]
        out.print(f"store {shown(store)}: schema version {have}; {len(pending)} pending")
        for m in pending:
            out.print(f"  {m.version:04d} {m.name}")
        if pending and not dry_run:
            _retry(lambda: apply_migrations(st.con))
            out.print(f"upgraded to version {current_version(st.con)}")
    finally:
        st.close()


@app.command()
def sql(
    store: str = STORE,
    query: str = typer.Argument(..., help="One SELECT statement."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv, json or parquet."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file."),
    max_rows: int = typer.Option(
        100_000, "--max-rows", "--limit", min=0, help="At most this many rows."
    ),
    timeout: float = typer.Option(
        30.0, "--timeout", min=0.001, help="Stop the query after this many seconds."
    ),
) -> None:
    """Run one read-only SELECT over the store (views gs_partitions, macro gs_lc).

    The query goes through the SQL sandbox: only the store's tables, views and macros and
    a few table functions (range, generate_series, unnest); no files, settings or writes.

    Example: geomstore sql runs/moons "SELECT step, n_regions FROM gs_partitions ORDER BY step"
    """
    with open_store(store, read_only=True) as st:
        res = st.sql(query, max_rows=max_rows, timeout=timeout)
    emit(res.table, fmt, output, truncated=res.truncated)


@app.command()
def partitions(
    store: str = STORE,
    model: str | None = typer.Option(None, "--model", "-m", help="Only this model (name)."),
    slice_name: str | None = typer.Option(None, "--slice", help="Only this slice (name or id)."),
    checkpoint: list[str] = typer.Option(
        [], "--checkpoint", "-c", help="Only these checkpoints (repeatable)."
    ),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv, json or parquet."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file."),
) -> None:
    """List the stored partitions: model, checkpoint, step, slice, regions, edges, id.

    The same listing as store.partitions() in Python and GET /api/partitions over HTTP.

    Example: geomstore partitions runs/moons --model moons-mlp
    """
    with open_store(store, read_only=True) as st:
        table = st.partitions(model=model, slice=slice_name, checkpoints=checkpoint or None)
    if fmt == "table":
        keep = ["model", "checkpoint", "step", "slice", "n_regions", "n_edges", "partition_id"]
        table = table.select([c for c in keep if c in table.column_names])
    emit(table, fmt, output, title=f"{table.num_rows} partition(s)")


@app.command()
def export(
    store: str = STORE,
    target: str = typer.Argument(..., help="A folder (GeoParquet files) or a .duckdb file."),
) -> None:
    """Export the store as GeoParquet files (one per table) or one .duckdb file.

    Example: geomstore export runs/moons moons-parquet/
    """
    with open_store(store) as st, err.status("exporting ..."):
        files = st.export(target)
    out.print(f"exported {len(files)} file(s) to {target}")


@app.command("add-points")
def add_points(
    store: str = STORE,
    name: str = typer.Argument(..., help="The data set's name (for lc/compare/plot --points)."),
    inputs: Path = typer.Argument(
        ..., help="Inputs (n, *input_shape): a .npy file, or a .npz with x (and y, labels)."
    ),
    labels: Path | None = typer.Option(None, help="A .npy file of integer labels, one per input."),
    split: str = typer.Option("train", help="Which split (train, test, ...): part of its id."),
    box: list[str] = BOX,
    through: list[Path] = THROUGH,
    slice_name: list[str] = NAMED,
    margin: float = MARGIN,
) -> None:
    """Store a data set projected onto slices: what lc, compare and plot take as --points.

    Each input is kept with its slice coordinates, its distance to the plane and its label.

    Example: geomstore add-points runs/moons moons-train x_train.npz --box=-2,-1.5,3,2
    """
    require_store(store)
    x, y = _points_file(inputs)
    if labels is not None:
        lx, ly = _points_file(labels)
        y = lx if labels.suffix == ".npy" else ly  # an .npz gives its y (or labels)
        if y is None:
            raise GeomstoreError(f"--labels {labels} holds no y (or labels) array.")
    if not (box or through or slice_name):
        raise GeomstoreError("give the slice(s): --slice NAME, --box x0,y0,x1,y1 or --through")
    with store_with_slices(store, box, through, slice_name, margin) as (st, sls):
        for sl in sls:
            st.add_points(name, sl, x, labels=y, split=split)
            err.print(f"stored {len(x)} points as {name!r} ({split}) on slice {sl.name}")


def _points_file(path: Path) -> tuple[np.ndarray, Any]:
    """(inputs, labels or None) from a .npy or .npz file, never unpickling anything."""
    if not path.is_file():
        raise GeomstoreError(f"{path} does not exist.")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                xs = [k for k in ("x", "X", "inputs") if k in z]
                if not xs:
                    raise GeomstoreError(
                        f"{path} holds {', '.join(z.keys()) or 'no arrays'}; name the inputs x "
                        "(np.savez(f, x=..., y=...))."
                    )
                ys = [k for k in ("y", "labels") if k in z]
                return z[xs[0]], (z[ys[0]] if ys else None)
    except (ValueError, OSError, EOFError, pickle.PickleError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else "the file ends early"
        raise GeomstoreError(
            f"cannot read {path}: {why}; save it with np.save or np.savez."
        ) from None
    raise GeomstoreError(f"{path}: expected a .npy or .npz file (np.save / np.savez).")
