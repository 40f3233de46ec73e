"""DuckDB connections with the extensions geomstore needs, loaded from their PyPI packages.

This is the one place that knows about extensions: a missing one raises
:class:`MissingExtensionError` naming the package to install.
"""

from __future__ import annotations

import duckdb

from geomstore.errors import MissingExtensionError

__all__ = ["EXTENSIONS", "connect"]

# extension name -> PyPI package that ships it (pinned in pyproject.toml)
EXTENSIONS = {
    "spatial": "duckdb-extension-spatial==1.5.5",
    "ducklake": "duckdb-extension-ducklake==1.5.5",
    "sqlite_scanner": "duckdb-extension-sqlite-scanner==1.5.5",
}


OPTIONAL_EXTENSIONS = {
    "postgres_scanner": "duckdb-extension-postgres-scanner==1.5.5",
    "httpfs": "duckdb-extension-httpfs==1.5.5",
}
# optional extensions that come with one of geomstore's extras
_EXTRAS = {"httpfs": "geomstore[s3]"}


def load_optional(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """Load an extension needed only by some stores (a PostgreSQL catalog, S3 data)."""
    _load(con, name, OPTIONAL_EXTENSIONS[name])


def _load(con: duckdb.DuckDBPyConnection, name: str, package: str | None = None) -> None:
    try:
        con.execute(f"LOAD {name}")
        return
    except duckdb.Error:
        pass
    try:
        import duckdb_extensions

        duckdb_extensions.import_extension(name, con=con)
        con.execute(f"LOAD {name}")
    except Exception as exc:
        fix = (
            f"pip install {_EXTRAS[name]}"
            if name in _EXTRAS
            else f"pip install {package or EXTENSIONS[name]} duckdb-extensions==1.5.5"
        )
        raise MissingExtensionError(
            f"the DuckDB extension {name!r} is not available ({exc}); install it with: {fix}"
        ) from None


def connect(database: str = ":memory:", *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with spatial, ducklake and sqlite loaded."""
    # no replacement scans (a table name resolving to a Python variable of the caller's
    # frame): as a connection setting it holds for every cursor of the instance, the SQL
    # sandbox's included, which cannot set it once the configuration is locked
    con = duckdb.connect(
        database, read_only=read_only, config={"python_enable_replacements": False}
    )
    con.execute("SET enable_progress_bar = false")  # library calls print nothing
    for name in EXTENSIONS:
        _load(con, name)
    return con
