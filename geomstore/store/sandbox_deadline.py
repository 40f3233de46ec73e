"""A time limit over a block of read queries (one service request): every read connection
the block uses is interrupted once the limit has passed, until the block ends.

DuckDB's ``interrupt()`` stops only the statement running at that moment on that very
connection, and does not carry over to the next statement. A request runs several
statements (on its thread's cursor, and on cursors the sandbox borrows), with Python work
between them, so the watcher keeps interrupting every registered connection from the
moment the limit passes until the block exits, and a statement that would start later is
refused before it runs (:meth:`Deadline.check`).
"""

from __future__ import annotations

import contextlib
import threading

import duckdb

from geomstore.errors import QueryTimeoutError

__all__ = ["Deadline"]

#: Seconds between two interrupts of the same connections once the limit has passed.
REPEAT = 0.02


class Deadline:
    """Interrupts its connections from ``seconds`` after it starts until :meth:`close`.

    Examples
    --------
    >>> import duckdb
    >>> from geomstore.store.sandbox_deadline import Deadline
    >>> con = duckdb.connect()
    >>> d = Deadline(0.2, advice="ask for less.")
    >>> d.add(con)
    >>> try:
    ...     con.execute("SELECT count(*) FROM range(10000000000)").fetchall()
    ... except duckdb.InterruptException:
    ...     print(d.fired)
    True
    >>> d.close()
    """

    def __init__(self, seconds: float, *, advice: str) -> None:
        self.seconds = float(seconds)
        self.advice = advice
        self._fired = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._cons: list[duckdb.DuckDBPyConnection] = []
        self._watcher = threading.Thread(target=self._watch, name="geomstore-deadline", daemon=True)
        self._watcher.start()

    @property
    def fired(self) -> bool:
        """Whether the limit has passed."""
        return self._fired.is_set()

    def error(self) -> QueryTimeoutError:
        """The error a block that ran past the limit raises."""
        return QueryTimeoutError(
            f"the query ran past its time limit of {self.seconds:g} s and was stopped; "
            f"{self.advice}",
            timeout=self.seconds,
        )

    def check(self) -> None:
        """Raise :meth:`error` if the limit has passed (before starting more work)."""
        if self._fired.is_set():
            raise self.error()

    def add(self, con: duckdb.DuckDBPyConnection) -> None:
        """Interrupt ``con`` too (until :meth:`discard`)."""
        with self._lock:
            self._cons.append(con)

    def discard(self, con: duckdb.DuckDBPyConnection) -> None:
        """Stop interrupting ``con``; once this returns, the deadline never touches it."""
        with self._lock, contextlib.suppress(ValueError):
            self._cons.remove(con)

    def _watch(self) -> None:
        if self._done.wait(self.seconds):
            return
        self._fired.set()
        while True:
            with self._lock:
                for con in self._cons:
                    with contextlib.suppress(Exception):
                        con.interrupt()
            if self._done.wait(REPEAT):
                return

    def close(self) -> None:
        """Stop the watcher; no connection is interrupted after this returns."""
        self._done.set()
        self._watcher.join()
        with self._lock:
            self._cons.clear()
