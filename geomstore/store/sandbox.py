"""The SQL sandbox: the one read path for SQL written by users (Store.sql, CLI, service).

A statement runs only after DuckDB's own parser has turned it into a tree
(``SELECT json_serialize_sql(?)``) and every node of that tree has passed these rules:

- exactly one statement, and it is a SELECT (``json_serialize_sql`` serializes nothing
  else, so SET, PRAGMA, COPY, ATTACH, INSTALL, LOAD, EXPORT, CALL and every write fail);
- every table it names is one of the store's own tables or views (``regions``,
  ``gs_partitions``, ...) or a common table expression in scope, so a quoted file path
  (``FROM '/etc/passwd'``) or another database's table never resolves;
- every table function is the store's own macro (``gs_lc``) or on :data:`TABLE_FUNCTIONS`
  (``range``, ``generate_series``, ``unnest``, ...): file readers, ``glob``, ``sqlite_*``,
  ``postgres_*``, ``ST_Read*``, ``parquet_*``, ``query`` and the like are refused;
- every scalar, aggregate or window function is one DuckDB knows and none of
  :data:`DENIED_FUNCTIONS` / :data:`DENIED_PREFIXES` (settings, sequences, sleeping, logs).

Under the rules, the read connection itself is hardened: external access is disabled
(only the store's own files and data path stay readable), extension auto-loading is off,
a memory limit and a thread limit are set and the configuration is locked. Every query has
a timeout (the connection is interrupted from a timer thread) and a row cap that reports
``truncated``. Errors are one line about the user's query.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from geomstore.errors import (
    QueryTimeoutError,
    SQLError,
    SQLRefusedError,
)
from geomstore.store.sandbox_deadline import Deadline
from geomstore.store.sandbox_rules import (
    DENIED_FUNCTIONS,
    DENIED_PREFIXES,
    MAX_QUERY_CHARS,
    SHIELDED,
    TABLE_FUNCTIONS,
    Policy,
    check_params,
    check_sql,
    wrap,
)
from geomstore.store.sqlutil import ALIAS, _sql_helpers
from geomstore.store.unavailable import IO_ERRORS, unreadable
from geomstore.store.unavailable import first_line as _first_line

if TYPE_CHECKING:
    from geomstore.store.store import QueryResult, Store

__all__ = [
    "DENIED_FUNCTIONS",
    "DENIED_PREFIXES",
    "MAX_QUERY_CHARS",
    "TABLE_FUNCTIONS",
    "Policy",
    "ReadPath",
    "check_sql",
    "harden",
    "wrap",
]

# the hardened read connection ------------------------------------------------------------------
#: Defaults of the read connection; a Store's ``sql_memory_limit`` / ``sql_threads`` override.
MEMORY_LIMIT = "4GB"
THREADS = max(1, min(4, os.cpu_count() or 1))


def _allowed_paths(store: Store) -> tuple[list[str], list[str]]:
    """Where the read connection may still read: (directories, single files).

    Only the store's own files: a directory store's data path and catalog files, a
    ``.duckdb`` store's file and its write-ahead log. Never the folder around them, where
    other files may lie (a ``.duckdb`` file's neighbours, a store's ``uploads/``). DuckDB's
    temporary files (spilling) do not pass this check, so their folder needs no entry.
    """
    from geomstore.store.store import CATALOG

    dirs: list[str] = []
    files: list[str] = []
    data = store.data_path
    if data:
        dirs.append(data if "://" in data else f"{Path(data).resolve()}/")
    if store.kind == "ducklake":
        catalog = Path(store.target).resolve() / CATALOG
        files += [str(catalog), *(f"{catalog}{end}" for end in ("-wal", "-shm", "-journal"))]
    if store.kind == "duckdb":
        file = Path(store.target).resolve()
        files += [str(file), f"{file}.wal"]
    return list(dict.fromkeys(dirs)), files


def harden(
    con: duckdb.DuckDBPyConnection,
    *,
    allowed: Sequence[str],
    allowed_files: Sequence[str] = (),
    memory_limit: str = MEMORY_LIMIT,
    threads: int = THREADS,
) -> None:
    """Disable external access (but the folders ``allowed`` and the files ``allowed_files``)
    and auto-loading; set limits; lock the config.

    These settings hold for the whole DuckDB instance of ``con``: for a ``.duckdb`` store,
    whose single instance also writes, they bound the writer too.
    """
    if allowed:
        con.execute("SET allowed_directories = ?", [list(allowed)])
    if allowed_files:
        con.execute("SET allowed_paths = ?", [list(allowed_files)])
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    with contextlib.suppress(duckdb.Error):  # not settable once the instance is running
        con.execute("SET allow_community_extensions = false")
    with contextlib.suppress(duckdb.Error):  # only in builds with the Python replacement scan
        con.execute("SET python_enable_replacements = false")
    con.execute("SET memory_limit = ?", [memory_limit])
    con.execute("SET threads = ?", [int(threads)])
    con.execute("SET lock_configuration = true")


class ReadPath:
    """A store's hardened read connection, its per-thread cursors and the SQL sandbox."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # one process owns a .duckdb file: read through a cursor of the writer's instance
        base = store.con.cursor() if store.kind == "duckdb" else store._open(read_only=True)
        dirs, files = _allowed_paths(store)
        try:
            harden(
                base,
                allowed=dirs,
                allowed_files=files,
                memory_limit=getattr(store, "sql_memory_limit", MEMORY_LIMIT),
                threads=getattr(store, "sql_threads", THREADS),
            )
        except Exception:
            base.close()
            raise
        self.base = base
        self._lock = threading.Lock()
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._idle: list[duckdb.DuckDBPyConnection] = []
        self._policy: Policy | None = None

    def _cursor(self, *, users: bool = False) -> duckdb.DuckDBPyConnection:
        """A new cursor; ``users``: one for users' SQL, on which the job tables are views
        without the workers' claim tokens and the submitted files' paths."""
        with self._lock:
            con = self.base.cursor()
            self._cursors.append(con)
        con.execute(f"USE {ALIAS}")
        _sql_helpers(con)
        if users:
            for name, columns in SHIELDED.items():
                with contextlib.suppress(duckdb.Error):  # an older schema: no such table
                    con.execute(
                        f"CREATE TEMP VIEW {name} AS SELECT {', '.join(columns)} "
                        f"FROM {ALIAS}.main.{name}"
                    )
        return con

    def reader(self) -> duckdb.DuckDBPyConnection:
        """This thread's read connection (DuckDB connections are not shared across threads).

        Under a :meth:`deadline` that has passed, raises
        :class:`~geomstore.errors.QueryTimeoutError` instead of handing out more work.
        """
        limit: Deadline | None = getattr(self._local, "deadline", None)
        if limit is not None:
            limit.check()
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._cursor()
            self._local.con = con
        return con

    @contextlib.contextmanager
    def deadline(self, seconds: float, *, advice: str = "ask for less.") -> Iterator[Deadline]:
        """Stop this thread's reads (:meth:`reader`, :meth:`sql`) after ``seconds``.

        Every statement running on them is interrupted and the block raises
        :class:`~geomstore.errors.QueryTimeoutError` (whose message ends with ``advice``),
        also when its last statement ended in time but the block did not.
        """
        outer: Deadline | None = getattr(self._local, "deadline", None)
        limit = Deadline(seconds, advice=advice)
        try:
            limit.add(self.reader())
            self._local.deadline = limit
            yield limit
        except Exception as exc:
            # an interrupted statement surfaces as whatever its caller made of it
            if limit.fired and not isinstance(exc, QueryTimeoutError):
                raise limit.error() from exc
            raise
        finally:
            self._local.deadline = outer
            limit.close()
        limit.check()

    @property
    def policy(self) -> Policy:
        """What queries may name (read once; refreshed when a query names something new)."""
        if self._policy is None:
            self._policy = Policy.of(self.reader())
        return self._policy

    @contextlib.contextmanager
    def _borrow(self) -> Iterator[tuple[duckdb.DuckDBPyConnection, list[bool]]]:
        with self._lock:
            con = self._idle.pop() if self._idle else None
        if con is None:
            con = self._cursor(users=True)
        broken = [False]
        try:
            yield con, broken
        finally:
            if broken[0]:
                with self._lock:
                    self._cursors.remove(con)
                con.close()
            else:
                with self._lock:
                    self._idle.append(con)

    def sql(
        self,
        query: str,
        params: Sequence[Any] | dict[str, Any] | None,
        *,
        max_rows: int,
        timeout: float | None,
    ) -> QueryResult:
        """Check ``query``, run it with a timeout and a row cap (see :meth:`Store.sql`)."""
        from geomstore.store.store import QueryResult

        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
            raise SQLError(f"max_rows must be a whole number >= 0, got {max_rows!r}.")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise SQLError(f"timeout must be a number of seconds > 0 (or None), got {timeout!r}.")
        check_params(params)
        try:
            statement = check_sql(query, self.policy, max_rows=max_rows, params=params)
        except SQLError:
            # a table or macro made since the policy was read (a migration): read again
            self._policy = Policy.of(self.reader())
            statement = check_sql(query, self._policy, max_rows=max_rows, params=params)
        limit: Deadline | None = getattr(self._local, "deadline", None)
        if limit is not None:
            limit.check()
        with self._borrow() as (con, broken):
            fired = threading.Event()

            def interrupt() -> None:
                fired.set()
                con.interrupt()

            timer = threading.Timer(timeout, interrupt) if timeout is not None else None
            if timer is not None:
                timer.daemon = True
                timer.start()
            if limit is not None:
                limit.add(con)
            try:
                # fetched whole (a streamed fetch cannot be interrupted); LIMIT caps the plan
                table = con.execute(statement, params).to_arrow_table()
            except duckdb.InterruptException:
                broken[0] = True
                if limit is not None and limit.fired and not fired.is_set():
                    raise limit.error() from None
                raise QueryTimeoutError(
                    f"the query ran longer than its {timeout or 0:g} s limit and was stopped; "
                    "narrow it (WHERE partition_id = ..., LIMIT) or pass a longer timeout.",
                    timeout=float(timeout or 0.0),
                ) from None
            except duckdb.OutOfMemoryException:
                raise SQLError(
                    "the query needs more memory than the read path allows "
                    f"({getattr(self.store, 'sql_memory_limit', MEMORY_LIMIT)}); narrow it "
                    "(fewer rows or columns, no huge joins)."
                ) from None
            except duckdb.PermissionException:
                raise SQLRefusedError(
                    "the query tried to reach files or settings outside the store and was refused.",
                    reason="permission",
                ) from None
            except IO_ERRORS as exc:  # the data path, not the query: say where and what to check
                raise unreadable(self.store, exc) from exc
            except duckdb.Error as exc:
                raise SQLError(_first_line(exc)) from None
            except pa.ArrowException as exc:  # e.g. nesting deeper than Arrow's 64 levels
                raise SQLError(
                    f"the result cannot be returned ({_first_line(exc)}); select fewer "
                    "levels of nesting (unnest, or cast to VARCHAR)."
                ) from None
            finally:
                if limit is not None:
                    limit.discard(con)
                if timer is not None:
                    timer.cancel()
                if fired.is_set() or (limit is not None and limit.fired):
                    broken[0] = True
        truncated = table.num_rows > max_rows
        return QueryResult(table.slice(0, max_rows) if truncated else table, truncated)

    def close(self) -> None:
        """Close every cursor and the base connection."""
        with self._lock:
            cursors, self._cursors, self._idle = self._cursors, [], []
        for con in cursors:
            with contextlib.suppress(duckdb.Error):
                con.close()
        with contextlib.suppress(duckdb.Error):
            self.base.close()
