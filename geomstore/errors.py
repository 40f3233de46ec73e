"""Typed errors raised by geomstore; every one derives from :class:`GeomstoreError`."""

from __future__ import annotations

from typing import Any

__all__ = [
    "AbortedWriteError",
    "CheckpointConflictError",
    "DataPathError",
    "DataUnavailableError",
    "ExecutorError",
    "GeomstoreError",
    "InvalidSliceError",
    "MemoryBudgetError",
    "MissingExtensionError",
    "ModelShapeError",
    "NotFoundError",
    "QueryTimeoutError",
    "ReadOnlyQueryError",
    "SQLError",
    "SQLRefusedError",
    "SchemaVersionError",
    "StoreError",
    "UnsupportedModelError",
]


class GeomstoreError(Exception):
    """Base class of every error geomstore raises on bad input."""


class InvalidSliceError(GeomstoreError, ValueError):
    """A slice's points, basis or domain cannot define a 2-D plane and a convex domain."""


class UnsupportedModelError(GeomstoreError, TypeError):
    """The model contains a layer or operation that is not piecewise linear or not supported."""


class ModelShapeError(GeomstoreError, ValueError):
    """The slice's input dimension does not match what the model accepts."""


class StoreError(GeomstoreError):
    """The store cannot be opened, read or written as asked."""


class MissingExtensionError(StoreError):
    """A DuckDB extension geomstore needs is not installed."""


class SchemaVersionError(StoreError):
    """The store's schema is newer than this geomstore, or older and opened read-only."""


class ReadOnlyQueryError(StoreError):
    """A query on the read-only SQL path tried to write, read files or load extensions."""


class AbortedWriteError(StoreError):
    """A write was rolled back on purpose (a job's claim was lost to another worker)."""


class CheckpointConflictError(StoreError, ValueError):
    """A checkpoint name of a model is stored already with other weights (or architecture):
    one name, one checkpoint, so that queries by name never mix two of them."""


class DataUnavailableError(StoreError):
    """The store's data files could not be fetched: an object store that does not answer,
    refused credentials, a missing bucket (the query service answers 503)."""


class DataPathError(StoreError, ValueError):
    """A store's data path (a directory or ``s3://`` URL) or its S3 settings cannot be used."""


class ExecutorError(GeomstoreError, ValueError):
    """A compute executor is unknown, missing (Ray not installed) or cannot use this store."""


class SQLRefusedError(ReadOnlyQueryError, ValueError):
    """The SQL sandbox refused a statement before running it (``reason`` says which rule).

    ``reason`` names the rule: "statement" (not a SELECT), "multiple", "table" (not the
    store's), "function" (reads files or the host), "size", "parse" or "permission".
    """

    def __init__(self, message: str, *, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # keep the field across pickling (workers)
        return (type(self), (str(self),), self.__dict__)


class SQLError(StoreError, ValueError):
    """A read-only query is wrong (unknown table or column, bad types, bad parameters)."""


class QueryTimeoutError(StoreError, TimeoutError):
    """A read-only query ran past its time limit and was interrupted (``timeout`` in s)."""

    def __init__(self, message: str, *, timeout: float = 0.0) -> None:
        super().__init__(message)
        self.timeout = timeout

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self),), self.__dict__)


class NotFoundError(StoreError, LookupError):
    """An unknown model, slice, checkpoint, partition or data set (``kind``, ``name``)."""

    def __init__(self, message: str, *, kind: str = "", name: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self),), self.__dict__)


class MemoryBudgetError(GeomstoreError, ValueError):
    """One cell of the partition needs more memory than the budget (``partition(memory=)``)."""
