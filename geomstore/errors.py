"""Typed errors raised by geomstore; every one derives from :class:`GeomstoreError`."""

from __future__ import annotations

__all__ = [
    "GeomstoreError",
    "InvalidSliceError",
    "ModelShapeError",
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
