"""Versioned schema migrations: ordered SQL files, a ledger, one transaction each."""

from __future__ import annotations

import contextlib
import importlib.resources
import re
from dataclasses import dataclass

import duckdb

from geomstore.errors import SchemaVersionError

__all__ = ["Migration", "apply_migrations", "current_version", "migrations"]

LEDGER = "schema_migrations"


@dataclass(frozen=True)
class Migration:
    """One numbered migration: ``NNNN_name.sql`` in the migrations package."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """All migrations shipped with this geomstore, in order."""
    out = []
    for f in importlib.resources.files("geomstore.migrations").iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", f.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), f.read_text()))
    return sorted(out, key=lambda m: m.version)


def _ledger_exists(con: duckdb.DuckDBPyConnection) -> bool:
    rows = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ? "
        "AND table_catalog = current_database()",
        [LEDGER],
    ).fetchone()
    return bool(rows and rows[0])


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    """The highest applied migration (0 for an empty store)."""
    if not _ledger_exists(con):
        return 0
    row = con.execute(f"SELECT coalesce(max(version), 0) FROM {LEDGER}").fetchone()
    return int(row[0]) if row else 0


def apply_migrations(con: duckdb.DuckDBPyConnection, *, upto: int | None = None) -> list[int]:
    """Apply pending migrations in order, each with its ledger row in one transaction.

    Idempotent: applied migrations are skipped. Returns the versions applied now.
    """
    known = migrations()
    latest = known[-1].version
    have = current_version(con)
    if have > latest:
        raise SchemaVersionError(
            f"the store has schema version {have}, newer than this geomstore knows ({latest}); "
            "upgrade geomstore (pip install -U geomstore)."
        )
    if not _ledger_exists(con):
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {LEDGER} "
            "(version INTEGER, name VARCHAR, applied_at TIMESTAMP)"
        )
    done = []
    for mig in known:
        if mig.version <= have or (upto is not None and mig.version > upto):
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            for stmt in filter(None, (s.strip() for s in _statements(mig.sql))):
                con.execute(stmt)
            con.execute(
                f"INSERT INTO {LEDGER} VALUES (?, ?, now()::TIMESTAMP)", [mig.version, mig.name]
            )
            con.execute("COMMIT")
        except Exception:
            with contextlib.suppress(duckdb.TransactionException):
                con.execute("ROLLBACK")
            raise
        done.append(mig.version)
    return done


def _statements(sql: str) -> list[str]:
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return "\n".join(lines).split(";")
