"""The geomstore command line: a thin layer over the Python API.

Every command takes the store as its first argument (or ``$GEOMSTORE_STORE``): a
directory (created if missing), a ``.duckdb`` file, or ``postgres:DSN``.
"""

from __future__ import annotations

import sys

from geomstore.cli import compute, demo, queries, serve, store_cmds
from geomstore.cli.common import app, err
from geomstore.errors import GeomstoreError

__all__ = ["app", "compute", "demo", "main", "queries", "serve", "store_cmds"]


def main() -> None:
    """Entry point: user errors become 'Error: ...' on stderr and exit code 1."""
    try:
        app(standalone_mode=True)
    except GeomstoreError as exc:
        err.print(f"Error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("Interrupted.")
        sys.exit(130)
