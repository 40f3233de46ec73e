"""Typed errors raised by geomstore; every one derives from :class:`GeomstoreError`."""

from __future__ import annotations

__all__ = [
    "AbortedWriteError",
    "DataPathError",
    "GeomstoreError",
    "InvalidSliceError",
    "MissingExtensionError",
    "ModelShapeError",
    "ReadOnlyQueryError",
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


class DataPathError(StoreError, ValueError):
    """A store's data path (a directory or ``s3://`` URL) or its S3 settings cannot be used."""
