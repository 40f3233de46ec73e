"""Data a store could not fetch (an S3 endpoint that does not answer, refused credentials,
a missing bucket) as one :class:`~geomstore.errors.DataUnavailableError` line that names
the data path, never a catalog DSN (which may hold a password)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import duckdb

from geomstore.errors import DataUnavailableError, StoreError

if TYPE_CHECKING:
    from geomstore.store.store import Store

__all__ = ["IO_ERRORS", "first_line", "io_errors", "unreadable"]


def first_line(exc: BaseException) -> str:
    """An error's first non-empty line (its type's name when it has none)."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


#: DuckDB's errors for a data file it could not fetch (an S3 endpoint that does not answer,
#: refused credentials, a missing object).
IO_ERRORS = (duckdb.IOException, duckdb.HTTPException)


def unreadable(store: Store, exc: BaseException) -> StoreError:
    """The one-line error for a read that the store's data path could not serve.

    Names the data path (a local store without one: its directory), DuckDB's first line
    (which names the file or URL) and what to check.

    Examples
    --------
    >>> import duckdb, tempfile, geomstore
    >>> from geomstore.store.unavailable import unreadable
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     error = unreadable(store, duckdb.IOException("IO Error: Could not connect"))
    >>> str(error).startswith("cannot read the store's data at ")
    True
    >>> str(error).split(" (")[1].split(")")[0]
    'IOException: IO Error: Could not connect'
    """
    where = store.data_path
    if where is None and not store.target.startswith(("postgres:", "postgresql://")):
        where = store.target  # a DSN may hold a password: never named
    at = f" at {where}" if where else ""
    return DataUnavailableError(
        f"cannot read the store's data{at} ({type(exc).__name__}: {first_line(exc)}); check "
        "the S3 endpoint ($GEOMSTORE_S3_ENDPOINT), the credentials and $GEOMSTORE_DATA_PATH."
    )


@contextlib.contextmanager
def io_errors(store: Store) -> Iterator[None]:
    """Turn DuckDB's errors for data it could not fetch into :func:`unreadable`'s
    :class:`~geomstore.errors.StoreError` (the cause is kept)."""
    try:
        yield
    except IO_ERRORS as exc:
        raise unreadable(store, exc) from exc
