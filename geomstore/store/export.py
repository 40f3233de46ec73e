"""What a store hands to other tools: a SQLAlchemy engine (duckdb-engine) on it, and an
export as GeoParquet files or one ``.duckdb`` file (:meth:`Store.engine
<geomstore.store.store.Store.engine>`, :meth:`Store.export
<geomstore.store.store.Store.export>`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from geomstore.errors import StoreError
from geomstore.store.connection import connect
from geomstore.store.schema import LEDGER
from geomstore.store.sqlutil import ALIAS, _sql_helpers, sql_literal
from geomstore.store.unavailable import IO_ERRORS, unreadable

if TYPE_CHECKING:
    from geomstore.store.store import Store

__all__ = ["DATA_TABLES", "export", "sqlalchemy_engine"]

#: The tables that hold a store's data (the rest is its job queue and schema ledger).
DATA_TABLES = (
    "models",
    "checkpoints",
    "slices",
    "partitions",
    "regions",
    "edges",
    "boundary",
    "datasets",
    "points",
)


def sqlalchemy_engine(store: Store) -> Any:
    import sqlalchemy
    from sqlalchemy import event

    from geomstore.store import objectstore
    from geomstore.store.connection import EXTENSIONS, _load

    if store.kind != "ducklake":
        raise StoreError(
            "a SQLAlchemy engine is offered for directory stores only: a .duckdb store "
            "belongs to one process at a time. Use a directory store (geomstore.open(DIR))."
        )
    eng = sqlalchemy.create_engine("duckdb:///:memory:")
    data = store.data_path or f"{Path(store.target) / 'data'}/"

    @event.listens_for(eng, "connect")
    def _attach(dbapi_conn: Any, _record: Any) -> None:
        raw = getattr(dbapi_conn, "_ConnectionWrapper__c", dbapi_conn)
        for name in EXTENSIONS:
            _load(raw, name)
        if store.data_path is not None and objectstore.is_url(store.data_path):
            objectstore.configure(raw, store.data_path)
        opts = f"DATA_PATH {sql_literal(data)}, READ_ONLY"
        raw.execute(f"ATTACH {sql_literal(store._attach)} AS {ALIAS} ({opts})")
        raw.execute(f"USE {ALIAS}")
        _sql_helpers(raw)

    return eng


def export(store: Store, target: str | Path) -> list[Path]:
    if "://" in str(target):  # Path() would make s3://b/p a local folder named "s3:"
        raise StoreError(
            f"export writes local files; {target} is a URL. Export to a local folder or "
            ".duckdb file and copy it there (the store's own data may live at an s3:// "
            "data path)."
        )
    tables = (*DATA_TABLES, "jobs", "job_heartbeats", LEDGER)
    con, fresh = store.con, None
    if store.kind == "duckdb" and store._read is not None:
        # the read path has locked this instance's file access: copy through Arrow
        fresh = con = connect()
        for table in tables:
            con.register(table, store.con.execute(f"SELECT * FROM {table}").to_arrow_table())
    try:
        if str(target).endswith(".duckdb"):
            path = Path(target)
            if path.exists():
                raise StoreError(f"{path} exists; export into a new file.")
            con.execute(f"ATTACH {sql_literal(str(path))} AS gs_export")
            try:
                for table in tables:
                    con.execute(f"CREATE TABLE gs_export.{table} AS SELECT * FROM {table}")
            finally:
                con.execute("DETACH gs_export")
            return [path]
        out = Path(target)
        _check_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for table in DATA_TABLES:
            path = out / f"{table}.parquet"
            con.execute(
                f"COPY (SELECT * FROM {table}) TO {sql_literal(str(path))} (FORMAT parquet)"
            )
            files.append(path)
        return files
    except IO_ERRORS as exc:
        if isinstance(exc, duckdb.HTTPException) or str(Path(target)) not in str(exc):
            raise unreadable(store, exc) from exc  # reading the store failed
        first = str(exc).splitlines()[0]
        raise StoreError(
            f"cannot write the export to {target} ({type(exc).__name__}: {first}); check "
            "that folder."
        ) from exc
    finally:
        if fresh is not None:
            fresh.close()


def _check_folder(out: Path) -> None:
    """An export goes into a new or empty folder, or over an earlier export: never among
    other files (a checkpoint folder, say), which it would mix with or overwrite."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out} is a file; export into a folder or a new .duckdb file.")
    ours = {f"{table}.parquet" for table in DATA_TABLES}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise StoreError(
            f"{out} holds other files ({shown}); export into a new or empty folder (an "
            "earlier export there is replaced)."
        )
