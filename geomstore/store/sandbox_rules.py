"""The SQL sandbox's rules: what a user's SELECT may name, checked on DuckDB's own parse
tree before anything runs (see :mod:`geomstore.store.sandbox` for the read path that
applies them).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb

from geomstore.errors import SQLError, SQLRefusedError
from geomstore.store.sqlutil import ALIAS
from geomstore.store.unavailable import first_line as _first_line

__all__ = [
    "DENIED_FUNCTIONS",
    "DENIED_PREFIXES",
    "MAX_QUERY_CHARS",
    "SHIELDED",
    "SLOW_FUNCTIONS",
    "TABLE_FUNCTIONS",
    "Policy",
    "check_sql",
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
#: Functions whose time grows as the square of their strings' length, in one call that a
#: timeout cannot interrupt (a query of 80 characters would run for hours).
SLOW_FUNCTIONS = frozenset({"levenshtein", "editdist3", "damerau_levenshtein"})
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
#: Store tables users' SQL reads through a view of these columns (unqualified names
#: resolve to the view; the catalog-qualified table is refused): the jobs without the
#: workers' claim tokens and the submitted files' server paths.
SHIELDED: dict[str, tuple[str, ...]] = {
    "jobs": (
        "job_id",
        "model",
        "checkpoint",
        "step",
        "status",
        "attempts",
        "worker",
        "claimed_at",
        "finished_at",
        "error",
        "partition_id",
        "created_at",
    ),
    "job_heartbeats": ("beat_at",),
}
#: Name prefixes of the catalog's system views, which no CTE may shadow.
_SYSTEM_PREFIXES = ("pg_", "information_schema")  # duckdb_, pragma_, sqlite_: _denied
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
    #: the catalog's system tables and views (no CTE may take their names)
    system_names: frozenset[str] = frozenset()

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
        system = con.execute(
            "SELECT lower(view_name) FROM duckdb_views() WHERE internal "
            "UNION SELECT lower(table_name) FROM duckdb_tables() WHERE internal"
        ).fetchall()
        return cls(
            relations=frozenset(r[0] for r in rel),
            system_names=frozenset(r[0] for r in system),
            table_macros=frozenset(macros),
            scalars=frozenset(n for n in scalars if not _denied(n)),
        )


def _denied(name: str) -> bool:
    return name in DENIED_FUNCTIONS or name in SLOW_FUNCTIONS or name.startswith(DENIED_PREFIXES)


def _looks_like_path(name: str) -> bool:
    return not _IDENT.match(name)


def _one_statement(query: str) -> str:
    """The text of the one SELECT in ``query`` (without a trailing semicolon)."""
    if not isinstance(query, str):
        raise SQLRefusedError(
            f"a query is a string of SQL, got {type(query).__name__}.", reason="parse"
        )
    if not _encodable(query):
        raise SQLError(
            "the query holds a character that is not valid Unicode (a lone surrogate such "
            "as \\ud800); send UTF-8 text."
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


def _encodable(text: str) -> bool:
    """Whether ``text`` is Unicode that can be written (no lone surrogate, ``"\\ud800"``,
    which JSON and Python allow but UTF-8, DuckDB and files do not)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def nested(value: Any) -> Iterator[tuple[Any, int]]:
    """``value`` and every value inside it (lists, tuples, mappings' keys and values) with
    its depth, walked without recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        yield v, depth
        if isinstance(v, Mapping):
            stack.extend((x, depth + 1) for x in (*v.keys(), *v.values()))
        elif isinstance(v, (list, tuple)):
            stack.extend((x, depth + 1) for x in v)


def holds_non_unicode(value: Any) -> bool:
    """Whether text anywhere in ``value`` is not Unicode (see :func:`nested`)."""
    return any(isinstance(v, str) and not _encodable(v) for v, _ in nested(value))


def check_params(params: Any) -> None:
    """Refuse parameter values DuckDB cannot take: text with lone surrogates, nesting
    deeper than Arrow's 64 levels (clear errors rather than a driver's traceback)."""
    for value, depth in nested(params):
        if depth > 64:
            raise SQLError("a parameter is nested more than 64 levels deep; flatten it.")
        if isinstance(value, str) and not _encodable(value):
            raise SQLError(
                "a parameter holds a character that is not valid Unicode (a lone surrogate "
                "such as \\ud800); send UTF-8 text."
            )


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


def check_sql(
    query: str,
    policy: Policy,
    *,
    max_rows: int = 0,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
) -> str:
    """Refuse ``query`` unless it is one SELECT naming only what ``policy`` allows.

    Returns the statement to run (:func:`wrap` of the query); that statement is what the
    rules were checked on, so what runs is what was checked. ``params`` are the values the
    query will run with (a LIKE pattern may be one). Raises
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
    for fn, ident in _walk(_tree(statement)["statements"][0], policy):
        value = _param(params, ident)
        if value is not None and not isinstance(value, str):
            raise SQLError(f"the pattern of {_SHOWN.get(fn, fn)} (${ident}) must be a string.")
        _check_pattern(fn, value)
    return statement


def _param(params: Sequence[Any] | Mapping[str, Any] | None, ident: str) -> Any:
    """The value of parameter ``$ident`` (None where ``params`` do not hold it)."""
    if isinstance(params, Mapping):
        return params.get(ident)
    if params is not None and not isinstance(params, (str, bytes)) and ident.isdigit():
        i = int(ident) - 1
        return params[i] if 0 <= i < len(params) else None
    return None


def _walk(root: Any, policy: Policy) -> list[tuple[str, str]]:
    """Check every node under ``root``; returns the (function, parameter) pairs whose
    pattern is a parameter, for :func:`check_sql` to check with the parameters' values.

    Common table expressions are in scope as DuckDB scopes them: a CTE's body sees the
    CTEs defined before it (and itself only as the recursive side of a recursive CTE),
    the query under the WITH sees them all. Anywhere else the name is a table of the
    catalog, and must be one of the store's.
    """
    pattern_params: list[tuple[str, str]] = []
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
            entries = cte_map["map"]
            names = [_cte_name(str(e.get("key", "")), policy) for e in entries]
            for i, entry in enumerate(entries):
                stack.append((entry.get("value"), ctes | frozenset(names[:i]), False))
            node = {k: v for k, v in node.items() if k != "cte_map"}
            ctes = ctes | frozenset(names)
        kind = node.get("type")
        if kind == "RECURSIVE_CTE_NODE":
            own = ctes | {str(node.get("cte_name", "")).lower()}
            stack.extend(
                (v, own if k == "right" else ctes, False)
                for k, v in node.items()
                if isinstance(v, (dict, list))
            )
            continue
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
            name = str(node["function_name"])
            _check_function(name, policy)
            if name.lower() in _PATTERNS:
                ident = _pattern_of(name.lower(), node.get("children"))
                if ident is not None:
                    pattern_params.append((name.lower(), ident))
        if kind in ("PIVOT", "COLUMN_DATA", "DELIM_GET"):
            raise SQLRefusedError(
                f"{kind} table references are not run here; write the query as a plain SELECT.",
                reason="statement",
            )
        stack.extend((v, ctes, False) for v in node.values() if isinstance(v, (dict, list)))
    return pattern_params


def _cte_name(name: str, policy: Policy) -> str:
    """``name`` lowered, refused unless a plain identifier that shadows no system view."""
    if not _IDENT.match(name):
        raise SQLRefusedError(
            f"the common table expression name {name!r} is not a plain identifier; "
            "name it with letters, digits and underscores.",
            reason="table",
        )
    low = name.lower()
    if _denied(low) or low.startswith(_SYSTEM_PREFIXES) or low in policy.system_names:
        raise SQLRefusedError(
            f"the common table expression name {name!r} is the name of a system table or "
            "view; give it another name.",
            reason="table",
        )
    return low


#: LIKE, ILIKE and GLOB and their negations and ESCAPE forms, as the parser names them.
_PATTERNS = frozenset(
    {
        "~~",
        "!~~",
        "~~*",
        "!~~*",
        "~~~",
        "!~~~",
        "like_escape",
        "not_like_escape",
        "ilike_escape",
        "not_ilike_escape",
    }
)
_SHOWN = {"~~": "LIKE", "!~~": "NOT LIKE", "~~*": "ILIKE", "!~~*": "NOT ILIKE", "~~~": "GLOB"}
#: The longest LIKE / ILIKE / GLOB pattern that takes DuckDB's general (backtracking) matcher.
MAX_PATTERN_CHARS = 1000
_ADVICE = (
    "use at most one wildcard that is followed by more pattern (a trailing one is free), "
    "or regexp_matches() / regexp_full_match() (linear time), starts_with(), contains()."
)


def _pattern_of(fn: str, children: Any) -> str | None:
    """Check the pattern of a LIKE-like call when it is a literal; returns the parameter
    identifier when it is a parameter (checked with its value), else refuses."""
    pat = children[1] if isinstance(children, list) and len(children) > 1 else None
    if isinstance(pat, dict) and pat.get("type") == "VALUE_CONSTANT":
        value = pat.get("value") or {}
        _check_pattern(fn, None if value.get("is_null") else str(value.get("value", "")))
        return None
    if isinstance(pat, dict) and pat.get("type") == "VALUE_PARAMETER":
        return str(pat.get("identifier", ""))
    raise SQLRefusedError(
        f"the pattern of {_SHOWN.get(fn, fn)} must be a string literal or a parameter here: "
        "a computed pattern can take hours to match on a long string, in one call that the "
        "query's timeout cannot stop; for a computed pattern use regexp_matches() (linear "
        "time).",
        reason="function",
    )


def _check_pattern(fn: str, pattern: str | None) -> None:
    """Refuse a pattern on which DuckDB's backtracking matcher can take time that grows
    as a power of the string's length: more than one wildcard that is followed by more
    pattern. Plain LIKE without ``_`` has a fast path (segments, one scan) and is free."""
    if pattern is None:
        return
    if fn in ("~~", "!~~") and "_" not in pattern:
        return
    star = "*" if fn in ("~~~", "!~~~") else "%"
    inner = re.sub(re.escape(star) + "+", star, pattern).rstrip(star)
    why = ""
    if inner.count(star) > 1:
        why = f"more than one {star!r} followed by more pattern"
    elif len(pattern) > MAX_PATTERN_CHARS:
        why = f"more than {MAX_PATTERN_CHARS} characters"
    if why:
        raise SQLRefusedError(
            f"the {_SHOWN.get(fn, fn)} pattern {pattern[:60]!r} has {why}: matching it can "
            "take hours on a long string, in one call that the query's timeout cannot stop; "
            + _ADVICE,
            reason="function",
        )


def _check_table(node: dict[str, Any], ctes: frozenset[str], policy: Policy) -> None:
    name = str(node.get("table_name", ""))
    if not name:
        return
    catalog = str(node.get("catalog_name", "")).lower()
    schema = str(node.get("schema_name", "")).lower()
    low = name.lower()
    if not catalog and not schema and low in ctes:
        return
    if low in SHIELDED and ALIAS in (catalog, schema):
        raise SQLRefusedError(
            f"read {name} without the catalog name ({name}, not {ALIAS}.{name}): the "
            "store's table also holds the workers' claim tokens and the server's file paths.",
            reason="table",
        )
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
    if low in SLOW_FUNCTIONS:
        raise SQLRefusedError(
            f"the function {name}() is not allowed on the read-only path: its time grows as "
            "the square of the strings' length, in one call that the query's timeout cannot "
            "stop; use jaro_winkler_similarity(), jaccard() or hamming() (linear time).",
            reason="function",
        )
    if _denied(low) or low in policy.table_macros or low in TABLE_FUNCTIONS:
        raise SQLRefusedError(
            f"the function {name}() is not allowed on the read-only path (it reads files, "
            "changes settings or inspects the host).",
            reason="function",
        )
    raise SQLError(f"no function named {name!r}; see DuckDB's and spatial's function lists.")
