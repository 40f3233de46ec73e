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
import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from geomstore.errors import (
    QueryTimeoutError,
    SQLError,
    SQLRefusedError,
)
from geomstore.store.sandbox_deadline import Deadline
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

#: Table functions a query may call besides the store's own table macros.
TABLE_FUNCTIONS = frozenset(
    {"range", "generate_series", "unnest", "json_each", "json_tree", "st_generatepoints"}
)
#: Scalar functions that reach the host, change session state or only waste time.
DENIED_FUNCTIONS = frozenset(
    {
        "current_setting",
        "currval",
        "nextval",
        "setseed",
        "sleep_ms",
        "pg_sleep",
        "write_log",
        "getenv",
        "getvariable",
        "json_serialize_plan",
        "json_execute_serialized_sql",
        "query",
        "query_table",
        "histogram",
        "histogram_values",
        "which_secret",
        "checkpoint",
        "force_checkpoint",
        "summary",
    }
)
#: Name prefixes of function families that read files, attach or inspect the host.
DENIED_PREFIXES = (
    "read_",
    "glob",
    "sqlite_",
    "postgres_",
    "pg_clear",
    "parquet_",
    "ducklake_",
    "duckdb_",
    "pragma_",
    "st_read",
    "st_drivers",
    "shapefile",
    "python_",
    "pandas_",
    "arrow_",
    "enable_",
    "disable_",
    "sniff_",
    "rtree_",
    "test_",
    "truncate_",
)
#: Functions the parser emits that duckdb_functions() does not list (special forms).
_SPECIAL = frozenset(
    {"unnest", "unlist", "grouping", "grouping_id", "try", "coalesce", "ifnull", "extract"}
)
#: The longest statement the sandbox parses.
MAX_QUERY_CHARS = 100_000
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CATALOGS = frozenset({"", ALIAS, "temp"})
_SCHEMAS = frozenset({"", "main", ALIAS, "temp"})


@dataclass(frozen=True)
class Policy:
    """What a query may name: the store's relations, its table macros, known functions."""

    relations: frozenset[str]
    table_macros: frozenset[str]
    scalars: frozenset[str]
    extra_table_functions: frozenset[str] = field(default=TABLE_FUNCTIONS)

    @classmethod
    def of(cls, con: duckdb.DuckDBPyConnection) -> Policy:
        """Read the store's tables, views and macros and DuckDB's functions from ``con``."""
        rel = con.execute(
            "SELECT lower(table_name) FROM duckdb_tables() WHERE database_name = $a "
            "UNION SELECT lower(view_name) FROM duckdb_views() "
            "WHERE NOT internal AND database_name IN ($a, 'temp')",
            {"a": ALIAS},
        ).fetchall()
        funcs = con.execute(
            "SELECT DISTINCT lower(function_name), function_type, database_name "
            "FROM duckdb_functions()"
        ).fetchall()
        macros = {n for n, t, db in funcs if t == "table_macro" and db in (ALIAS, "temp")}
        scalars = {
            n for n, t, _db in funcs if t in ("scalar", "aggregate", "macro", "window")
        } | _SPECIAL
        return cls(
            relations=frozenset(r[0] for r in rel),
            table_macros=frozenset(macros),
            scalars=frozenset(n for n in scalars if not _denied(n)),
        )


def _denied(name: str) -> bool:
    return name in DENIED_FUNCTIONS or name.startswith(DENIED_PREFIXES)


def _looks_like_path(name: str) -> bool:
    return not _IDENT.match(name)


def _one_statement(query: str) -> str:
    """The text of the one SELECT in ``query`` (without a trailing semicolon)."""
    if not isinstance(query, str):
        raise SQLRefusedError(
            f"a query is a string of SQL, got {type(query).__name__}.", reason="parse"
        )
    if len(query) > MAX_QUERY_CHARS:
        raise SQLRefusedError(
            f"the query has {len(query)} characters, more than {MAX_QUERY_CHARS}; "
            "shorten it (pass values as parameters).",
            reason="size",
        )
    try:
        stmts = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise SQLError(f"cannot parse the query: {_first_line(exc)}") from None
    if len(stmts) != 1:
        raise SQLRefusedError(
            f"give exactly one statement, got {len(stmts)}; run them one at a time.",
            reason="multiple",
        )
    kind = stmts[0].type
    if kind != duckdb.StatementType.SELECT:
        raise SQLRefusedError(
            f"only SELECT queries run here, got {kind.name}; the read-only path cannot "
            "change the store, its settings or its extensions (write through store.add).",
            reason="statement",
        )
    return str(stmts[0].query).rstrip().rstrip(";")


_PARSERS = threading.local()


def _parser() -> duckdb.DuckDBPyConnection:
    """This thread's in-memory connection for parsing: no store attached, so a parse never
    starts a transaction on the store's catalog."""
    con = getattr(_PARSERS, "con", None)
    if con is None:
        con = duckdb.connect(":memory:")
        _PARSERS.con = con
    return con


def _tree(query: str) -> dict[str, Any]:
    raw = _parser().execute("SELECT json_serialize_sql(?)", [query]).fetchone()
    try:
        tree: dict[str, Any] = json.loads(raw[0]) if raw else {"error": True}
    except RecursionError:
        raise SQLRefusedError(
            "the query is nested too deeply to check; flatten it (CTEs instead of nesting).",
            reason="size",
        ) from None
    if tree.get("error"):
        msg = str(tree.get("error_message", "not a SELECT"))
        raise SQLRefusedError(
            f"only plain SELECT queries run here ({msg.splitlines()[0]}).", reason="statement"
        )
    if len(tree.get("statements", [])) != 1:
        raise SQLRefusedError("give exactly one statement.", reason="multiple")
    return tree


def wrap(text: str, max_rows: int) -> str:
    """The statement that runs: the user's SELECT as a subquery under the row cap.

    The newlines keep a trailing ``--`` comment from swallowing the closing parenthesis.
    """
    return f"SELECT * FROM (\n{text}\n) AS gs_q LIMIT {int(max_rows) + 1}"


def check_sql(query: str, policy: Policy, *, max_rows: int = 0) -> str:
    """Refuse ``query`` unless it is one SELECT naming only what ``policy`` allows.

    Returns the statement to run (:func:`wrap` of the query); that statement is what the
    rules were checked on, so what runs is what was checked. Raises
    :class:`~geomstore.errors.SQLRefusedError` (an attack; ``reason`` says which rule) or
    :class:`~geomstore.errors.SQLError` (an unknown table or function). Nothing runs.

    Examples
    --------
    >>> import tempfile, geomstore
    >>> from geomstore.store.sandbox import check_sql
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     policy = store._read_path().policy
    ...     print(check_sql("SELECT count(*) FROM regions", policy, max_rows=10))
    ...     try:
    ...         check_sql("SELECT * FROM read_text('/etc/passwd')", policy)
    ...     except geomstore.errors.SQLRefusedError as exc:
    ...         print(exc.reason)
    SELECT * FROM (
    SELECT count(*) FROM regions
    ) AS gs_q LIMIT 11
    function
    """
    statement = wrap(_one_statement(query), max_rows)
    _walk(_tree(statement)["statements"][0], policy)
    return statement


def _walk(root: Any, policy: Policy) -> None:
    # iterative: a deeply nested query must not overflow Python's stack
    stack: list[tuple[Any, frozenset[str], bool]] = [(root, frozenset(), False)]
    while stack:
        node, ctes, is_table_fn = stack.pop()
        if isinstance(node, list):
            stack.extend((x, ctes, False) for x in node)
            continue
        if not isinstance(node, dict):
            continue
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict) and cte_map.get("map"):
            names = [str(e.get("key", "")) for e in cte_map["map"]]
            for n in names:
                if not _IDENT.match(n):
                    raise SQLRefusedError(
                        f"the common table expression name {n!r} is not a plain identifier; "
                        "name it with letters, digits and underscores.",
                        reason="table",
                    )
            ctes = ctes | {n.lower() for n in names}
        kind = node.get("type")
        if kind == "TABLE_FUNCTION":
            fn = node.get("function") or {}
            _check_table_function(str(fn.get("function_name", "")), policy)
            stack.extend(
                (v, ctes, False)
                for k, v in node.items()
                if k != "function" and isinstance(v, (dict, list))
            )
            stack.append((fn, ctes, True))
            continue
        if "table_name" in node:
            _check_table(node, ctes, policy)
        if "function_name" in node and not is_table_fn:
            _check_function(str(node["function_name"]), policy)
        if kind in ("PIVOT", "COLUMN_DATA", "DELIM_GET"):
            raise SQLRefusedError(
                f"{kind} table references are not run here; write the query as a plain SELECT.",
                reason="statement",
            )
        stack.extend((v, ctes, False) for v in node.values() if isinstance(v, (dict, list)))


def _check_table(node: dict[str, Any], ctes: frozenset[str], policy: Policy) -> None:
    name = str(node.get("table_name", ""))
    if not name:
        return
    catalog = str(node.get("catalog_name", "")).lower()
    schema = str(node.get("schema_name", "")).lower()
    low = name.lower()
    if not catalog and not schema and low in ctes:
        return
    if catalog in _CATALOGS and schema in _SCHEMAS and low in policy.relations:
        return
    if _looks_like_path(name) or _denied(low) or catalog not in _CATALOGS or schema not in _SCHEMAS:
        shown = ".".join(p for p in (catalog, schema, name) if p)
        raise SQLRefusedError(
            f"{shown!r} is not a table of this store (files and other databases are not "
            f"readable here); tables: {', '.join(sorted(policy.relations))}.",
            reason="table",
        )
    raise SQLError(
        f"no table or view named {name!r} in this store; tables: "
        f"{', '.join(sorted(policy.relations))}."
    )


def _check_table_function(name: str, policy: Policy) -> None:
    low = name.lower()
    if low in policy.table_macros or (low in policy.extra_table_functions and not _denied(low)):
        return
    allowed = ", ".join(sorted(policy.extra_table_functions | policy.table_macros))
    raise SQLRefusedError(
        f"the table function {name}() is not allowed on the read-only path (it may read "
        f"files, attach databases or inspect the host); allowed: {allowed}.",
        reason="function",
    )


def _check_function(name: str, policy: Policy) -> None:
    low = name.lower()
    if low in policy.scalars:
        return
    if _denied(low) or low in policy.table_macros or low in TABLE_FUNCTIONS:
        raise SQLRefusedError(
            f"the function {name}() is not allowed on the read-only path (it reads files, "
            "changes settings or inspects the host).",
            reason="function",
        )
    raise SQLError(f"no function named {name!r}; see DuckDB's and spatial's function lists.")


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

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            con = self.base.cursor()
            self._cursors.append(con)
        con.execute(f"USE {ALIAS}")
        _sql_helpers(con)
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
            con = self._cursor()
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
        try:
            statement = check_sql(query, self.policy, max_rows=max_rows)
        except SQLError:
            # a table or macro made since the policy was read (a migration): read again
            self._policy = Policy.of(self.reader())
            statement = check_sql(query, self._policy, max_rows=max_rows)
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
