"""The store's write lock: writers of every process and host take turns.

DuckLake lets two transactions that both append commit together, so two writers that each
found a partition (or its model, checkpoint or slice) missing would both write it. Under
this lock the check and the write are one step: a PostgreSQL catalog takes a
transaction-scoped advisory lock on its own server (released when the holder ends or
dies), a directory store a ``flock`` on ``write.lock`` beside its catalog (never the
catalog file itself, whose locks are SQLite's), and a ``.duckdb`` file has one process
anyway. Threads of one process take turns too. Making a new directory store happens
under the lock, and :func:`remove_new_store` takes back what a failed one made.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import duckdb

from geomstore.errors import StoreError
from geomstore.store.connection import connect
from geomstore.store.sqlutil import _mask_password, sql_literal

__all__ = ["LOCK_FILE", "WriteLock", "flock", "remove_new_store"]

LOCK_FILE = "write.lock"
_PG_LOCK = 0x67656F6D  # "geom": the advisory lock key of a PostgreSQL catalog's writers


class WriteLock:
    """One store's write lock (:meth:`hold`), for a store of ``kind`` at ``target``."""

    def __init__(self, kind: str, target: str, attach: str, *, read_only: bool) -> None:
        self.kind, self.target, self.attach, self.read_only = kind, target, attach, read_only
        self._threads = threading.RLock()  # the store's one write connection is shared
        self._held = 0  # hold()'s depth in the thread that holds _threads
        self._con: duckdb.DuckDBPyConnection | None = None  # the PostgreSQL lock's

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock (reentrant in the thread that holds it)."""
        with self._threads:
            self._held += 1
            try:
                if self._held > 1:  # this thread holds it already
                    yield
                elif self.kind == "ducklake-postgres":
                    with self.postgres():
                        yield
                elif self.kind == "ducklake" and not self.read_only:
                    with flock(Path(self.target)):
                        yield
                else:
                    yield
            finally:
                self._held -= 1

    def close(self) -> None:
        """Close the PostgreSQL lock's connection, if one was opened."""
        if self._con is not None:
            self._con.close()
            self._con = None

    @contextlib.contextmanager
    def postgres(self) -> Iterator[None]:
        """The PostgreSQL catalog's advisory lock, on a connection of its own."""
        if self._con is None:
            from geomstore.store.connection import load_optional

            con = connect()
            try:
                load_optional(con, "postgres_scanner")
                dsn = self.attach.removeprefix("ducklake:postgres:")
                con.execute(f"ATTACH {sql_literal(dsn)} AS gs_lock (TYPE postgres)")
            except duckdb.Error as exc:
                con.close()
                detail = " ".join(_mask_password(str(exc), self.target).split())  # one line
                shown = _mask_password(self.target)
                raise StoreError(
                    f"cannot connect to the PostgreSQL catalog {shown} (check its host, port, "
                    f"user and password): {detail}"
                ) from None
            self._con = con
        con = self._con
        con.execute("BEGIN TRANSACTION")
        try:
            # the PostgreSQL transaction of this DuckDB transaction holds the lock
            con.execute(
                f"CALL postgres_execute('gs_lock', 'SELECT pg_advisory_xact_lock({_PG_LOCK})')"
            )
            yield
        finally:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")


def remove_new_store(root: Path, made_root: bool, catalog: str) -> None:
    """Remove what opening a new directory store made before it failed: its ``catalog``
    file (and SQLite's files beside it), an empty data folder, the lock file, and ``root``
    itself when this open made it."""
    for name in (catalog, *(catalog + end for end in ("-wal", "-shm", "-journal"))):
        with contextlib.suppress(FileNotFoundError):
            (root / name).unlink()
    with contextlib.suppress(OSError):
        (root / "data").rmdir()  # only when empty
    with contextlib.suppress(FileNotFoundError):
        (root / LOCK_FILE).unlink()
    if made_root:
        with contextlib.suppress(OSError):
            root.rmdir()


@contextlib.contextmanager
def flock(root: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``root/write.lock`` (made when missing), released when the
    file closes: at the end of the block, or when the process dies."""
    import fcntl

    try:
        fh = open(root / LOCK_FILE, "a+b")  # noqa: SIM115 - closed below
    except OSError:  # a folder we may not write to: the catalog's own locks remain
        yield
        return
    with fh:
        # a file system without locks (some network mounts): as above
        with contextlib.suppress(OSError):
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
