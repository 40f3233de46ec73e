"""The geomstore command line: a thin layer over the Python API.

Every command takes the store as its first argument (or ``$GEOMSTORE_STORE``): a
directory (created if missing), a ``.duckdb`` file, or ``postgres:DSN``.
"""

from __future__ import annotations

import sys

from geomstore.cli import compute, demo, queries, serve, store_cmds
from geomstore.cli.common import app, err
from geomstore.errors import GeomstoreError
from geomstore.store.unavailable import IO_ERRORS, first_line

__all__ = ["app", "compute", "demo", "io_message", "main", "queries", "serve", "store_cmds"]


def io_message(exc: BaseException) -> str:
    """One line for DuckDB's error on data it could not read or write: its first line (which
    names the file or URL) and what to check.

    >>> import duckdb
    >>> print(io_message(duckdb.IOException("IO Error: Could not connect\\nmore")).split(";")[0])
    cannot read or write the data (IOException: IO Error: Could not connect)
    """
    return (
        f"cannot read or write the data ({type(exc).__name__}: {first_line(exc)}); check the S3 "
        "endpoint ($GEOMSTORE_S3_ENDPOINT), the credentials, $GEOMSTORE_DATA_PATH and the "
        "output folder."
    )


def main() -> None:
    """Entry point: user errors become 'Error: ...' on stderr and exit code 1."""
    try:
        app(standalone_mode=True)
    except GeomstoreError as exc:
        err.print(f"Error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except IO_ERRORS as exc:
        # data a command could not fetch or write where no query function said so (export)
        err.print(f"Error: {io_message(exc)}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("Interrupted.")
        sys.exit(130)
