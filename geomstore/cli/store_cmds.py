"""Commands on the store itself: init, migrate, sql, partitions, export."""

from __future__ import annotations

from pathlib import Path

import typer

from geomstore.cli.common import NEW_STORE, STORE, app, emit, err, open_store, out, require_store


@app.command()
def init(store: str = NEW_STORE) -> None:
    """Create a store (a directory, or a .duckdb file), or check an existing one.

    Example: geomstore init runs/moons
    """
    with open_store(store, create=True) as st:
        out.print(f"store {store}: {st.kind}, schema version {st.schema_version}")


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
        out.print(f"store {store}: schema version {have}; {len(pending)} pending")
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
    target: Path = typer.Argument(..., help="A folder (GeoParquet files) or a .duckdb file."),
) -> None:
    """Export the store as GeoParquet files (one per table) or one .duckdb file.

    Example: geomstore export runs/moons moons-parquet/
    """
    with open_store(store) as st, err.status("exporting ..."):
        files = st.export(target)
    out.print(f"exported {len(files)} file(s) to {target}")
