"""The geometry store: partitions of many models, slices and checkpoints as spatial rows.

The default store is a directory holding a DuckLake catalog (``catalog.sqlite``) and its
Parquet data files (``data/``): one process writes while others read, and every write is
one DuckLake transaction, so a partition is visible whole or not at all. A single
``.duckdb`` file also works, for one process at a time. This module holds :class:`Store`
(opening, reading, export); its writes are in :mod:`geomstore.store.write`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from geomstore._aliases import renamed_kwargs
from geomstore.engine.partition import Partition
from geomstore.errors import DataPathError, SchemaVersionError, StoreError
from geomstore.store.connection import connect
from geomstore.store.locks import WriteLock, flock, remove_new_store
from geomstore.store.schema import LEDGER, apply_migrations, current_version, migrations
from geomstore.store.sqlutil import (
    ALIAS,
    OPEN_CATALOGS,
    _mask_password,
    _retry,
    _sql_helpers,
    _wal_catalog,
    held_elsewhere,
    make_dirs,
    path_text,
    remove_dirs,
    sql_literal,
)
from geomstore.store.write import write_partition, write_points

if TYPE_CHECKING:
    from geomstore.store.sandbox import ReadPath

__all__ = ["QueryResult", "Store", "open_store"]

CATALOG = "catalog.sqlite"


@dataclass
class QueryResult:
    """Rows of a read-only query, capped: ``truncated`` says whether rows were left out."""

    table: pa.Table
    truncated: bool


class Store:
    """A geomstore store; use :func:`geomstore.open` to get one.

    Examples
    --------
    >>> import tempfile, torch, geomstore
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> part = geomstore.partition(net, geomstore.Slice.box((-1, -1), (1, 1)), device="cpu")
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     pid = store.add(part, model="toy", checkpoint="init", step=0)
    ...     store.sql("SELECT count(*) AS n FROM regions").table.column("n")[0].as_py() > 0
    True
    """

    _read: ReadPath | None = None  # the hardened read connection, made on first read

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        read_only: bool = False,
        data_path: str | os.PathLike[str] | None = None,
        upgrade: bool = True,
    ) -> None:
        self.target: str = path_text("store", target)
        self.data_path: str | None = path_text("data_path", data_path)
        target, data_path = self.target, self.data_path
        self.read_only = read_only
        self.kind, self._attach = self._describe(self.target)
        #: catalog listings by name, each with the catalog version it was read at
        self._catalog_memo: dict[str, tuple[int, Any]] = {}
        if data_path is not None:
            if self.kind == "duckdb":
                raise DataPathError(
                    f"a .duckdb store keeps its data inside the file, so data_path={data_path!r} "
                    "cannot be used; give a store directory or a postgres: catalog instead."
                )
            from geomstore.store.objectstore import normalize_data_path

            self.data_path = normalize_data_path(data_path)
        self._lock = WriteLock(self.kind, self.target, self._attach, read_only=read_only)
        self._ro: duckdb.DuckDBPyConnection | None = None
        self._catalog_key: str | None = None
        try:
            self.con = self._open(read_only=read_only)
        except BaseException:
            self._lock.close()
            raise
        if self.kind == "ducklake":  # see sqlutil.OPEN_CATALOGS
            self._catalog_key = str((Path(target) / CATALOG).resolve())
            OPEN_CATALOGS[self._catalog_key] += 1
        try:
            # under the write lock: a store another process is making is made when we look
            with self.exclusive():
                self._check_schema(read_only=read_only, upgrade=upgrade)
        except Exception:
            self.close()
            raise

    def _check_schema(self, *, read_only: bool, upgrade: bool) -> None:
        have = current_version(self.con)
        latest = migrations()[-1].version
        if have == 0:
            self._refuse_foreign()
        if have > latest:
            raise SchemaVersionError(
                f"the store at {self.shown} has schema version {have}, newer than this "
                f"geomstore knows ({latest}); upgrade geomstore."
            )
        if have < latest and upgrade:
            if read_only:
                raise SchemaVersionError(
                    f"the store at {self.shown} has schema version {have} and needs "
                    f"{latest}; open it for writing once (geomstore.open({self.shown!r})) "
                    "to upgrade it."
                )
            _retry(lambda: apply_migrations(self.con))

    # writers of several processes -------------------------------------------------------------
    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold the store's write lock (:class:`~geomstore.store.locks.WriteLock`): writers
        of every process and host, and threads of this one, take turns."""
        return self._lock.hold()

    # opening ---------------------------------------------------------------------------------
    def _refuse_foreign(self) -> None:
        """A catalog without geomstore's ledger must be empty: someone else's tables are
        never migrated into a store."""
        row = self.con.execute(
            "SELECT count(*), min(table_name) FROM duckdb_tables() "
            "WHERE database_name = ? AND table_name <> ?",
            [ALIAS, LEDGER],
        ).fetchone()
        if row is not None and row[0]:
            raise StoreError(
                f"{self.shown} holds tables that are not a geomstore store's (such as "
                f"{row[1]!r}) and no geomstore schema; it was left unchanged. Give a new "
                "path (or an empty file or directory) for the store."
            )

    @staticmethod
    def _describe(target: str) -> tuple[str, str]:
        if target.startswith(("postgres:", "postgresql://")):
            dsn = target.split(":", 1)[1] if target.startswith("postgres:") else target
            return "ducklake-postgres", f"ducklake:postgres:{dsn}"
        path = Path(target)
        if path.suffix == ".duckdb":
            if path.exists() and not path.is_file():
                raise StoreError(f"{target} is not a file; give a .duckdb file or a directory.")
            return "duckdb", str(path)
        if path.exists() and not path.is_dir():
            raise StoreError(
                f"{target} is a file but not a .duckdb file; give a store directory "
                "(created if missing) or a path ending in .duckdb."
            )
        others = (p for p in path.iterdir() if p.name != "write.lock") if path.is_dir() else ()
        if path.is_dir() and not (path / CATALOG).exists() and any(others):
            raise StoreError(
                f"{target} is a non-empty directory without a geomstore catalog ({CATALOG}); "
                "give an empty or new directory."
            )
        return "ducklake", f"ducklake:sqlite:{path / CATALOG}"

    def _open(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        con = connect()
        try:
            if self.kind == "duckdb":
                ro = " (READ_ONLY)" if read_only else ""
                con.execute(f"ATTACH {sql_literal(self._attach)} AS {ALIAS}{ro}")
            else:
                self._attach_lake(con, read_only=read_only)
            con.execute(f"USE {ALIAS}")
        except duckdb.Error as exc:
            con.close()
            detail = " ".join(_mask_password(str(exc), self.target).split())  # one line
            detail = held_elsewhere(detail) if self.kind == "duckdb" else detail
            raise StoreError(f"cannot open the store at {self.shown}: {detail}") from None
        except Exception:
            con.close()
            raise
        with contextlib.suppress(duckdb.Error):  # an older schema: helpers come after upgrade
            _sql_helpers(con)
        return con

    def _attach_lake(self, con: duckdb.DuckDBPyConnection, *, read_only: bool) -> None:
        """:meth:`_attach_at`; a directory store opened for writing is made (or found)
        under its ``write.lock``, so that processes opening a new store at once make it
        once, and one made here that fails to open is removed again (a retry with a
        corrected data path then starts afresh)."""
        if read_only:
            self._attach_at(con, read_only=True)
            return
        if self.kind == "ducklake-postgres":  # a new catalog's tables are made once
            with self._lock.postgres():
                self._attach_at(con, read_only=False)
            return
        root = Path(self.target)
        made_root = not root.exists()
        new = not (root / CATALOG).exists()
        if not new:  # a read-only file system, someone else's database: no lock file there
            if not os.access(root, os.W_OK):
                self._attach_at(con, read_only=False)  # says what is wrong
                return
            _wal_catalog(root / CATALOG, wal=False)
        root.mkdir(parents=True, exist_ok=True)
        try:
            with flock(root):
                new = not (root / CATALOG).exists()
                self._attach_at(con, read_only=False)
        except BaseException:
            if new:
                remove_new_store(root, made_root, CATALOG)
            raise

    def _attach_at(self, con: duckdb.DuckDBPyConnection, *, read_only: bool) -> None:
        """Attach a DuckLake catalog with its data path (given, recorded, or the default).

        A new catalog records its data path; an existing one is opened at the recorded
        path, and a different ``data_path=`` is refused rather than ignored. S3 data paths
        get an in-memory secret from the environment (:mod:`geomstore.store.objectstore`).
        """
        from geomstore.store import objectstore

        given = self.data_path
        path: str | None = given
        made: list[Path] = []
        if self.kind == "ducklake":
            root = Path(self.target)
            exists = (root / CATALOG).exists()
            if read_only and not exists:
                raise StoreError(
                    f"no store at {self.target}; create it with geomstore.open(path) or "
                    f"`geomstore init {self.target}`."
                )
            if exists and not os.access(root, os.W_OK):
                raise StoreError(
                    f"the store at {self.target} is on a read-only file system (or its "
                    "directory is not writable); its SQLite catalog (WAL mode) needs to "
                    "write beside itself even to be read: copy the store to a writable "
                    "place, or export it (store.export) where it is written."
                )
            if not read_only:
                root.mkdir(parents=True, exist_ok=True)
            _wal_catalog(root / CATALOG, wal=not read_only)
            if not exists and given is None:
                path = f"{(root / 'data').resolve()}/"
        else:
            if given is None:
                raise StoreError(
                    "a PostgreSQL catalog needs data_path= (a directory or s3:// URL for the "
                    "Parquet files): geomstore.open('postgres:...', data_path=DIR)."
                )
            from geomstore.store.connection import load_optional

            load_optional(con, "postgres_scanner")
        if path is not None:
            if objectstore.is_url(path):
                objectstore.configure(con, path)
                if given is not None and not read_only:
                    self._probe(con, path)
            elif not read_only:
                made = make_dirs(Path(path))
        opts = [f"DATA_PATH {sql_literal(path)}"] if path is not None else []
        opts += ["READ_ONLY"] if read_only else []
        attach = f"ATTACH {sql_literal(self._attach)} AS {ALIAS}" + (
            f" ({', '.join(opts)})" if opts else ""
        )
        try:
            _retry(lambda: con.execute(attach))
        except duckdb.Error as exc:
            m = re.search(r'existing data path in the catalog "([^"]*)"', str(exc))
            remove_dirs(made)  # refused: the folders made for it go
            if m is None:
                raise
            also = "" if self.kind == "ducklake-postgres" else ", or without data_path="
            raise DataPathError(
                f"the store at {self.shown} keeps its data files at {m.group(1)}, not {given}: "
                f"open it with data_path={m.group(1)!r}{also}."
            ) from None
        meta = f"__ducklake_metadata_{ALIAS}.ducklake_metadata"
        row = con.execute(f"SELECT value FROM {meta} WHERE key = 'data_path'").fetchone()
        recorded = str(row[0]) if row and row[0] else path
        if recorded is not None and recorded != path and objectstore.is_url(recorded):
            objectstore.configure(con, recorded)
        self.data_path = recorded

    def _probe(self, con: duckdb.DuckDBPyConnection, url: str) -> None:
        """List an object-store data path before a catalog records it: a mistyped bucket,
        endpoint or key fails here, before anything is written."""
        try:
            # a listing of one unlikely prefix: one cheap request, however many files exist
            probe = url.rstrip("/") + "/.geomstore-probe*"
            con.execute("SELECT count(*) FROM glob(?)", [probe]).fetchone()
        except duckdb.Error as exc:
            detail = _mask_password(str(exc).splitlines()[0], self.target)
            raise StoreError(
                f"cannot list the data path {url} ({type(exc).__name__}: {detail}); check the "
                "bucket's name, the endpoint and the credentials (GEOMSTORE_S3_* or AWS_*)."
            ) from None

    @property
    def shown(self) -> str:
        """The store's target as messages show it: a catalog DSN's password is masked."""
        return _mask_password(self.target)

    def close(self) -> None:
        """Close the store's connections."""
        if self._read is not None:
            self._read.close()
            self._read = None
        if self._ro is not None:
            self._ro.close()
            self._ro = None
        self.con.close()
        self._lock.close()
        if self._catalog_key is not None:
            OPEN_CATALOGS[self._catalog_key] -= 1
            if OPEN_CATALOGS[self._catalog_key] <= 0:
                del OPEN_CATALOGS[self._catalog_key]
            self._catalog_key = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        """The applied schema version."""
        return current_version(self.con)

    # writing ---------------------------------------------------------------------------------
    def add(
        self,
        partition: Partition,
        *,
        model: str,
        checkpoint: str,
        step: int | None = None,
        source: str | None = None,
        metrics: dict[str, float] | None = None,
        verified: bool | None = None,
        replace: bool = False,
        before_commit: Callable[[duckdb.DuckDBPyConnection, str], bool] | None = None,
    ) -> str:
        """Write one partition (and its model, checkpoint, slice) in one transaction.

        Returns the partition id. Writing the same checkpoint x slice x settings again is a
        no-op unless ``replace=True``. ``before_commit(con, partition_id)`` runs inside the
        transaction (the job queue marks its job done there); when it returns False the
        transaction is rolled back and :class:`~geomstore.errors.AbortedWriteError` raised.
        Threads may share one store: its writes take turns.
        """
        with self.exclusive():
            return write_partition(
                self,
                partition,
                model=model,
                checkpoint=checkpoint,
                step=step,
                source=source,
                metrics=metrics,
                verified=verified,
                replace=replace,
                before_commit=before_commit,
            )

    # reading ---------------------------------------------------------------------------------
    def reader(self) -> duckdb.DuckDBPyConnection:
        """The store's read connection: read-only, no file access outside the store.

        Query functions (``geomstore.queries``) run their own SQL here; user SQL goes
        through :meth:`sql`, which checks it first. Each statement reads the latest
        committed snapshot. Under a time limit of the service (a request's deadline) that
        has passed, raises :class:`~geomstore.errors.QueryTimeoutError` instead: long query
        functions ask for it again between batches of their work.

        Examples
        --------
        >>> import tempfile, geomstore
        >>> with geomstore.open(tempfile.mkdtemp()) as store:
        ...     store.reader().execute("SELECT count(*) FROM partitions").fetchone()
        (0,)
        """
        return self._read_path().reader()

    def _read_path(self) -> ReadPath:
        if self._read is None:
            from geomstore.store.sandbox import ReadPath

            self._read = ReadPath(self)
        return self._read

    def _data_paths(self) -> list[str]:
        """Where the read connection may read: the data path (and a directory store's root)."""
        paths = [] if self.data_path is None else [self.data_path]
        if self.kind == "ducklake":
            paths.append(f"{Path(self.target).resolve()}/")
        return paths

    _reader = reader  # the old private name, kept for code written against it

    def catalog_version(self) -> int | None:
        """A number that changes whenever any writer commits to the store, or None.

        A DuckLake store's current snapshot id (one metadata lookup, about 1.5 ms, seeing
        writers in other processes too); None for a ``.duckdb`` file, whose catalog is
        read afresh each time. The catalog listings of :mod:`geomstore.queries.catalog`
        are kept per version, so that a query service answers the same lookups fast.
        """
        if self.kind != "ducklake":
            return None
        row = self.reader().execute(f"SELECT id FROM {ALIAS}.current_snapshot()").fetchone()
        return None if row is None else int(row[0])

    def _memo(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()``, kept until the store's catalog version changes."""
        version = self.catalog_version()
        if version is None:
            return build()
        hit = self._catalog_memo.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        value = build()
        self._catalog_memo[key] = (version, value)
        return value

    def sql(
        self,
        query: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
        *,
        max_rows: int = 100_000,
        timeout: float | None = 30.0,
        limit: int | None = None,
    ) -> QueryResult:
        """Run one read-only SELECT through the SQL sandbox; at most ``max_rows`` rows return.

        Parameters
        ----------
        query : str
            One SELECT over the store's tables, views (``gs_partitions``) and macros
            (``gs_lc``); file readers, ATTACH, settings and writes are refused.
        params : sequence or dict, optional
            Values for ``?`` / ``$name`` placeholders.
        max_rows : int
            Row cap; ``QueryResult.truncated`` says whether rows were left out.
        timeout : float or None
            Seconds before the query is interrupted (:class:`QueryTimeoutError`).
        limit : int, optional
            Deprecated spelling of ``max_rows``.

        Examples
        --------
        >>> import tempfile, geomstore
        >>> with geomstore.open(tempfile.mkdtemp()) as store:
        ...     res = store.sql("SELECT * FROM range(5)", max_rows=3)
        >>> res.table.num_rows, res.truncated
        (3, True)
        """
        if limit is not None:
            import warnings

            warnings.warn(
                "Store.sql(limit=...) is deprecated; use max_rows=...",
                DeprecationWarning,
                stacklevel=2,
            )
            max_rows = limit
        return self._read_path().sql(query, params, max_rows=max_rows, timeout=timeout)

    def partitions(
        self,
        *,
        model: str | None = None,
        slice: str | None = None,
        checkpoints: Sequence[str] | None = None,
    ) -> pa.Table:
        """One row per stored partition (see :func:`geomstore.queries.partitions`).

        Examples
        --------
        >>> import tempfile, geomstore
        >>> with geomstore.open(tempfile.mkdtemp()) as store:
        ...     store.partitions().num_rows
        0
        """
        from geomstore.queries.catalog import partitions

        return partitions(self, model=model, slice=slice, checkpoints=checkpoints)

    def load_partition(self, partition_id: str) -> Partition:
        """Rebuild a stored partition (tables, slice, model summary, settings).

        The result has no model attached (``verify`` needs the model: recompute for that);
        its ``states`` are unpacked from the stored patterns.
        """
        from geomstore.store.load import load_partition

        return load_partition(self, partition_id)

    def load_slice(self, name: str) -> Any:
        """A stored slice (a :class:`~geomstore.Slice`) by name or slice id."""
        from geomstore.store.load import load_slice

        return load_slice(self, name)

    def engine(self) -> Any:
        """A SQLAlchemy engine (duckdb-engine) reading this store, for pandas and SQLAlchemy.

        Each pooled connection loads the extensions and attaches the store read-only.

        Examples
        --------
        >>> import sqlalchemy, tempfile, geomstore
        >>> with geomstore.open(tempfile.mkdtemp()) as store, store.engine().connect() as c:
        ...     c.execute(sqlalchemy.text("SELECT count(*) FROM regions")).scalar()
        0
        """
        from geomstore.store.export import sqlalchemy_engine

        return sqlalchemy_engine(self)

    @renamed_kwargs(slice_="slice")
    def add_points(
        self,
        name: str,
        slice: Any,
        x: Any,
        *,
        labels: Sequence[int] | Any | None = None,
        split: str = "train",
    ) -> str:
        """Store a data set projected onto a slice: u, distance to the plane, label, split.

        ``x`` holds inputs of the slice's input shape (n, *input_shape). Returns the id.
        """
        with self.exclusive():
            return write_points(self, name, slice, x, labels=labels, split=split)

    def export(self, target: str | Path) -> list[Path]:
        """Write every table as GeoParquet into a directory, or all into one ``.duckdb`` file."""
        from geomstore.store.export import export

        return export(self, target)


def open_store(
    target: str | Path, *, read_only: bool = False, data_path: str | Path | None = None
) -> Store:
    """Open or create a store: a directory (DuckLake + SQLite catalog) or a ``.duckdb`` file.

    Parameters
    ----------
    target : str or Path
        A directory (created if missing), a path ending in ``.duckdb`` (one process at a
        time), or ``postgres:dbname=... host=...`` for a DuckLake catalog in PostgreSQL
        (several hosts; needs ``data_path``).
    read_only : bool
        Open for reading only (never upgrades the schema).
    data_path : str or Path, optional
        Where the Parquet data files live: a directory or an ``s3://bucket/prefix/`` URL
        (S3 settings from the AWS environment, see :mod:`geomstore.store.objectstore`).
        Needed by a PostgreSQL catalog; a new directory store records it (default: its
        ``data/`` folder) and is reopened there, so it may be left out later; a different
        one is refused. A ``.duckdb`` store has no data path.

    Examples
    --------
    >>> import tempfile, geomstore
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     store.data_path.endswith("/data/")
    True
    """
    return Store(
        str(target),
        read_only=read_only,
        data_path=str(data_path) if data_path is not None else None,
    )
