"""Helpers of the store: content ids, busy-catalog retries, transactions, SQL conveniences."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from geomstore.errors import StoreError

ALIAS = "gs"
T = TypeVar("T")


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


def _retry(fn: Callable[[], T], *, attempts: int = 30) -> T:
    """Run fn, retrying while the catalog is busy (another writer holds it)."""
    for i in range(attempts):
        try:
            return fn()
        except duckdb.Error as exc:
            msg = str(exc).lower()
            busy = "locked" in msg or "busy" in msg or "conflict" in msg
            if not busy or i == attempts - 1:
                if busy:
                    raise StoreError(
                        f"the store stayed busy after {attempts} tries ({exc}); another "
                        "process is writing: try again later."
                    ) from None
                raise
            time.sleep(min(2.0, 0.05 * (1.5**i)) * (0.5 + random.random()))
    raise AssertionError("unreachable")


# gs_lc is local_complexity at one point (disk, hidden units) in SQL, and must agree with it:
# a disk that meets the domain (its centre inside, or some edge crossing it) has counts, one
# that misses it has null counts; edges with layer null are the domain's border, which bounds
# regions but is no neuron's zero set, so it adds no length to boundary_density (divided by
# the whole disk's area). A bad radius or an unknown partition id is an error, not a row.
# The statements are split at semicolons: none may stand inside one (not even in a string).
SQL_HELPERS = f"""
CREATE OR REPLACE TEMP VIEW gs_partitions AS
SELECT p.*, m.name AS model, c.name AS checkpoint, c.step, c.metrics, s.name AS slice_name
FROM {ALIAS}.partitions p
JOIN {ALIAS}.checkpoints c ON c.checkpoint_id = p.checkpoint_id
JOIN {ALIAS}.models m ON m.model_id = c.model_id
JOIN {ALIAS}.slices s ON s.slice_id = p.slice_id;
CREATE OR REPLACE TEMP MACRO gs_lc(pid, x, y, r) AS TABLE
WITH args AS (
    SELECT CASE
        WHEN NOT coalesce(r > 0 AND isfinite(r), false) THEN error(concat(
            'gs_lc: the radius r must be a finite number > 0, got ', coalesce(r::VARCHAR, 'NULL'),
            '.'))
        WHEN NOT EXISTS (SELECT 1 FROM {ALIAS}.partitions WHERE partition_id = pid)
            THEN error(concat('gs_lc: no partition ',
            CASE WHEN pid IS NULL THEN 'NULL' ELSE concat('''', pid, '''') END,
            ' in this store. List them with SELECT partition_id, model, checkpoint FROM ',
            'gs_partitions.'))
        ELSE (SELECT ST_Intersects(s.domain, ST_Point(x, y)) FROM {ALIAS}.partitions p
              JOIN {ALIAS}.slices s ON s.slice_id = p.slice_id WHERE p.partition_id = pid)
    END AS inside
), near AS (
    SELECT layer, neuron, region_left, region_right,
           u0_b - u0_a AS dx, u1_b - u1_a AS dy, u0_a - x AS fx, u1_a - y AS fy
    FROM {ALIAS}.edges
    WHERE partition_id = pid AND ST_DWithin(geometry, ST_Point(x, y), r * (1 + 1e-9))
), quad AS (
    SELECT *, dx * dx + dy * dy AS qa, 2 * (fx * dx + fy * dy) AS qb,
           fx * fx + fy * fy - r * r AS qc
    FROM near
), clip AS (
    SELECT layer, neuron, region_left, region_right,
           CASE WHEN qb * qb - 4 * qa * qc > 0 AND qa > 0 THEN
               (least(greatest((sqrt(qb * qb - 4 * qa * qc) - qb) / (2 * qa), 0.0), 1.0)
                - least(greatest((-qb - sqrt(qb * qb - 4 * qa * qc)) / (2 * qa), 0.0), 1.0))
               * sqrt(qa)
           ELSE 0.0 END AS seg_len
    FROM quad
), tally AS (
    SELECT count(DISTINCT (layer, neuron)) FILTER (WHERE seg_len > 0 AND layer IS NOT NULL)
               AS n_neurons,
           (SELECT count(DISTINCT region) FROM (
               SELECT region_left AS region FROM clip WHERE seg_len > 0
               UNION ALL SELECT region_right FROM clip WHERE seg_len > 0)) AS n_regions,
           coalesce(sum(seg_len) FILTER (WHERE layer IS NOT NULL), 0.0) AS length,
           coalesce(bool_or(seg_len > 0), false) AS touches
    FROM clip
)
SELECT CASE WHEN a.inside OR t.touches THEN t.n_neurons END AS n_neurons,
       CASE WHEN a.inside OR t.touches THEN greatest(1, t.n_regions) END AS n_regions,
       CASE WHEN a.inside OR t.touches THEN t.length / (pi() * r * r) END AS boundary_density
FROM args a, tally t;
"""


def sql_literal(value: str) -> str:
    """A SQL string literal (quotes doubled) for statements that take no parameters
    (ATTACH, COPY ... TO): a path with a quote in it stays one path.

    >>> sql_literal("it's")
    "'it''s'"
    """
    return "'" + value.replace("'", "''") + "'"


def _sql_helpers(con: duckdb.DuckDBPyConnection) -> None:
    """Per-connection SQL conveniences (documented in the README)."""
    for stmt in filter(None, (s.strip() for s in SQL_HELPERS.split(";"))):
        con.execute(stmt)


#: SQLite catalogs this process has open through DuckDB (resolved path -> open stores).
#: DuckDB's sqlite extension links its own SQLite; POSIX file locks belong to the process,
#: so closing any other handle on the same file (Python's sqlite3, even a plain open()) drops
#: the locks that SQLite holds, and a writer in another process then corrupts what this one
#: reads ("database disk image is malformed"). While a catalog is open here, nothing else
#: in this process may open it.
OPEN_CATALOGS: collections.Counter[str] = collections.Counter()


def _wal_catalog(path: Path, *, wal: bool = True) -> None:
    """Check that an existing catalog is a DuckLake catalog (or empty), and put it in WAL
    mode (persistent: readers then never block the writer) unless ``wal`` is False.

    A foreign SQLite database is refused before anything writes to it. Done only while
    no store of this process has the catalog open (see :data:`OPEN_CATALOGS`): one that
    is open here was checked when it was opened.
    """
    import sqlite3

    if OPEN_CATALOGS[str(path.resolve())]:
        return
    if not wal and not path.exists():
        return
    try:
        con = sqlite3.connect(path, timeout=30)
        try:
            tables = {
                row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if tables and "ducklake_metadata" not in tables:
                raise StoreError(
                    f"{path} is a SQLite database but not a geomstore (DuckLake) catalog; "
                    "it was left unchanged. Give a new or empty directory for the store."
                )
            mode = con.execute("PRAGMA journal_mode").fetchone()
            if wal and (mode is None or str(mode[0]).lower() != "wal"):
                con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot open the store's catalog {path}: {exc}") from None


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back if a transaction is still open (a failed COMMIT has already ended it)."""
    with contextlib.suppress(duckdb.TransactionException):
        con.execute("ROLLBACK")


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT, rolled back on any exception (also KeyboardInterrupt)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise


def _wkt_polygon(domain: Any) -> str:
    pts = [*domain.tolist(), domain[0].tolist()]
    return "POLYGON((" + ", ".join(f"{x!r} {y!r}" for x, y in pts) + "))"


def sql_in(values: Sequence[str]) -> str:
    """``('a', 'b', ...)``: string literals for ``column IN (...)``, quotes doubled.

    A literal list lets DuckDB (and DuckLake's file pruning) push the filter into the scan;
    a list parameter (``= ANY($ids)``) becomes a semi join once the query joins anything,
    and the scan then reads every partition's rows.
    """
    if not values:
        return "(NULL)"
    return "(" + ", ".join("'" + str(v).replace("'", "''") + "'" for v in values) + ")"


def _mask_password(target: str, secret_of: str | None = None) -> str:
    """Hide a password in a libpq DSN or URL (``password=...``, ``user:pw@host``).

    With ``secret_of`` (the DSN a message was made from), that DSN's password is also
    hidden wherever it stands in ``target`` (DuckDB quotes the DSN in its errors).

    >>> _mask_password("host=db password=s3cr3t user=me")
    'host=db password=*** user=me'
    >>> _mask_password('at "x" (s3cr3t)', "postgresql://me:s3cr3t@db/geo")
    'at "x" (***)'
    """
    masked = target
    if secret_of:
        for pw in _passwords(secret_of):
            masked = masked.replace(pw, "***")
    masked = re.sub(
        r"(password\s*=\s*)('[^']*'|\"[^\"]*\"|[^\s\"']+)", r"\1***", masked, flags=re.I
    )
    return re.sub(r"(://[^/:@\s]+:)[^@\s]+@", r"\1***@", masked)


def _passwords(dsn: str) -> list[str]:
    """The password values a libpq DSN or URL holds (quotes stripped), longest first."""
    found = [
        m.group(1) or m.group(2) or m.group(3)
        for m in re.finditer(
            r"password\s*=\s*(?:'([^']*)'|\"([^\"]*)\"|([^\s\"']+))", dsn, flags=re.I
        )
    ]
    found += re.findall(r"://[^/:@\s]+:([^@\s]+)@", dsn)
    return sorted({f for f in found if f}, key=len, reverse=True)


def path_text(what: str, value: Any) -> Any:
    """A path argument as text: a str, or an ``os.PathLike`` (``pathlib.Path``) made one."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise StoreError(
        f"{what} must be a path (str or pathlib.Path) or a 'postgres:...' catalog; "
        f"got {type(value).__name__} {value!r}."
    )


def held_elsewhere(detail: str) -> str:
    """DuckDB's lock conflict on a ``.duckdb`` file in geomstore's words (its own names a
    command-line flag of the duckdb shell); other errors unchanged."""
    held = re.search(r"Could not set lock.*?held in (.*?)(?:\.? See also|$)", detail)
    if held is None:
        return detail
    return (
        f"another process holds it ({held.group(1)}); a .duckdb store is open in one process "
        "at a time: close it there, or use a directory store, which many processes read and "
        "write at once"
    )


def make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the folders it made, deepest first (for :func:`remove_dirs`)."""
    made = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return made


def remove_dirs(made: list[Path]) -> None:
    """Take back what :func:`make_dirs` made, as long as the folders are still empty."""
    for p in made:
        with contextlib.suppress(OSError):
            p.rmdir()
