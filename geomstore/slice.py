"""Slices: an affine plane through input space with a convex polygon domain.

A slice maps 2-D coordinates ``u`` to model inputs ``x(u) = origin + u[0]*b0 + u[1]*b1``.
Inputs of any shape (images, sequences) are flattened in C order; ``input_shape``
restores the shape when the slice is lifted for a model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from geomstore.errors import InvalidSliceError

__all__ = ["Slice"]

_F64 = NDArray[np.float64]


def _short(v: float) -> str:
    """The shortest text that reads back as ``v``, without a trailing ``.0``."""
    text = repr(float(v))
    return text[:-2] if text.endswith(".0") else text


def _finite(name: str, value: ArrayLike) -> _F64:
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise InvalidSliceError(f"{name} contains NaN or inf; pass finite coordinates.")
    return arr


def _domain_points(domain: Any) -> Any:
    """A shapely Polygon's exterior ring, or the (n, 2) sequence as given."""
    if hasattr(domain, "exterior") and hasattr(domain, "interiors"):
        if domain.is_empty:
            raise InvalidSliceError("domain polygon is empty; give a convex polygon with area.")
        if len(domain.interiors):
            raise InvalidSliceError(
                "domain polygon has holes; give a convex polygon (for example its convex hull)."
            )
        return np.asarray(domain.exterior.coords, dtype=np.float64)[:, :2]
    if hasattr(domain, "geom_type"):
        raise InvalidSliceError(
            f"domain must be a convex Polygon or an (n, 2) sequence of vertices, got a "
            f"{domain.geom_type}; take its convex hull (geometry.convex_hull)."
        )
    return domain


def _convex_ccw(domain: _F64) -> _F64:
    """Validate a convex polygon and return it counter-clockwise, without repeated points."""
    if domain.ndim != 2 or domain.shape[1] != 2 or domain.shape[0] < 3:
        raise InvalidSliceError(
            f"domain must be an (n, 2) array of n >= 3 polygon vertices, got shape {domain.shape}."
        )
    if np.array_equal(domain[0], domain[-1]) and domain.shape[0] > 3:  # a closed ring
        domain = domain[:-1]
    # tolerances relative to the domain's own size (not its distance from the origin)
    size = float(np.max(np.ptp(domain, axis=0))) or 1.0
    nxt = np.roll(domain, -1, axis=0)
    if np.any(np.all(np.abs(domain - nxt) <= 1e-15 * size, axis=1)):
        raise InvalidSliceError("domain has repeated consecutive vertices; remove duplicates.")
    d = domain - domain[0]  # the shoelace about a vertex: no cancellation far from 0
    dn = np.roll(d, -1, axis=0)
    area2 = float(np.sum(d[:, 0] * dn[:, 1] - dn[:, 0] * d[:, 1]))
    if area2 < 0:
        domain = domain[::-1].copy()
        nxt = np.roll(domain, -1, axis=0)
    e = nxt - domain
    e_next = np.roll(e, -1, axis=0)
    cross = e[:, 0] * e_next[:, 1] - e[:, 1] * e_next[:, 0]
    if abs(area2) <= 1e-12 * size * size:
        raise InvalidSliceError("domain has zero area; give three or more non-collinear vertices.")
    if np.any(cross < -1e-12 * size * size):
        raise InvalidSliceError(
            "domain is not convex; give a convex polygon (for example its convex hull)."
        )
    return np.ascontiguousarray(domain)


@dataclass(frozen=True, eq=False)
class Slice:
    """An affine 2-D plane in a model's input space and a convex domain on it.

    Parameters
    ----------
    origin : array_like
        The input at ``u = (0, 0)``; any shape, flattened in C order.
    basis : array_like, shape (2, D)
        The two direction vectors ``b0`` and ``b1`` (linearly independent).
    domain : array_like, shape (n, 2), or shapely.Polygon
        Vertices of a convex polygon in ``u`` coordinates (any (n, 2) sequence, a closed
        ring included), or a convex shapely ``Polygon`` without holes.
    name : str, optional
        A human-readable name, stored with the slice.

    Examples
    --------
    >>> s = Slice.box((-1, -1), (1, 1))
    >>> s.lift([[0.5, 0.25]]).tolist()
    [[0.5, 0.25]]
    """

    origin: _F64
    basis: _F64
    domain: _F64
    input_shape: tuple[int, ...] = field(default=())
    name: str = ""

    def __init__(
        self,
        origin: ArrayLike,
        basis: ArrayLike,
        domain: ArrayLike,
        *,
        input_shape: Sequence[int] | None = None,
        name: str = "",
    ) -> None:
        o = _finite("origin", origin)
        shape = tuple(int(s) for s in (input_shape if input_shape is not None else o.shape))
        o = o.reshape(-1)
        b = _finite("basis", basis)
        if b.ndim < 2 or b.shape[0] != 2:
            raise InvalidSliceError(f"basis must hold two direction vectors, got shape {b.shape}.")
        b = b.reshape(2, -1)
        if b.shape[1] != o.size:
            raise InvalidSliceError(
                f"basis vectors have {b.shape[1]} entries but origin has {o.size}; "
                "give vectors of the same input shape."
            )
        if int(np.prod(shape)) != o.size:
            raise InvalidSliceError(f"input_shape {shape} does not hold {o.size} values.")
        gram = b @ b.T
        det = gram[0, 0] * gram[1, 1] - gram[0, 1] ** 2
        if gram[0, 0] == 0 or gram[1, 1] == 0 or det <= 1e-14 * gram[0, 0] * gram[1, 1]:
            raise InvalidSliceError(
                "basis vectors are zero or parallel; give two linearly independent directions."
            )
        d = _convex_ccw(_finite("domain", _domain_points(domain)))
        object.__setattr__(self, "origin", o)
        object.__setattr__(self, "basis", np.ascontiguousarray(b))
        object.__setattr__(self, "domain", d)
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "name", name)
        for arr in (o, self.basis, d):
            arr.setflags(write=False)

    # constructors ---------------------------------------------------------------------------
    @classmethod
    def box(cls, lower: Sequence[float], upper: Sequence[float], *, name: str = "") -> Slice:
        """The plane of a 2-input model itself, with a rectangular domain.

        Examples
        --------
        >>> Slice.box((0, 0), (2, 1)).area
        2.0
        >>> Slice.box((-1, -1), (1, 0.5)).name  # the default name, as the CLI's --box gives it
        'box(-1,-1,1,0.5)'
        """
        lo = _finite("lower", lower)
        hi = _finite("upper", upper)
        if lo.shape != (2,) or hi.shape != (2,):
            raise InvalidSliceError("box corners must be pairs (x, y).")
        if np.any(hi <= lo):
            raise InvalidSliceError(f"box upper {hi.tolist()} must exceed lower {lo.tolist()}.")
        dom = [[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]]
        if not name:  # as the CLI's --box names it: stored slices are found by name
            name = "box(" + ",".join(_short(v) for v in (*lo, *hi)) + ")"
        return cls(np.zeros(2), np.eye(2), dom, name=name)

    @classmethod
    def through(
        cls,
        a: ArrayLike,
        b: ArrayLike,
        c: ArrayLike,
        *,
        margin: float = 0.2,
        domain: str = "box",
        name: str = "",
    ) -> Slice:
        """The plane through three inputs (e.g. three images), with an orthonormal basis.

        The origin is ``a``; ``b0`` points from ``a`` to ``b``. The domain is the triangle
        ``(a, b, c)`` (``domain="triangle"``) or its bounding box (``domain="box"``), grown
        by ``margin`` times its size.

        Examples
        --------
        >>> s = Slice.through([0, 0, 0], [1, 0, 0], [0, 1, 0], margin=0.0, domain="triangle")
        >>> s.project([[0, 1, 0]])[0].round(12).tolist()
        [[0.0, 1.0]]
        """
        if domain not in ("box", "triangle"):
            raise InvalidSliceError(f"domain must be one of 'box', 'triangle'; got {domain!r}.")
        pa, pb, pc = (_finite(n, p) for n, p in (("a", a), ("b", b), ("c", c)))
        if not (pa.shape == pb.shape == pc.shape):
            raise InvalidSliceError("the three points must have the same shape.")
        shape = pa.shape
        fa, fb, fc = pa.reshape(-1), pb.reshape(-1), pc.reshape(-1)
        e0 = fb - fa
        n0 = np.linalg.norm(e0)
        if n0 == 0:
            raise InvalidSliceError("points a and b are identical; give three distinct points.")
        e0 = e0 / n0
        w = fc - fa
        e1 = w - (w @ e0) * e0
        n1 = np.linalg.norm(e1)
        if n1 <= 1e-12 * max(n0, np.linalg.norm(w)):
            raise InvalidSliceError("the three points are collinear; give points spanning a plane.")
        e1 = e1 / n1
        tri = np.array([[0.0, 0.0], [n0, 0.0], [w @ e0, w @ e1]])
        if margin < 0 or not np.isfinite(margin):
            raise InvalidSliceError("margin must be a finite number >= 0.")
        if domain == "triangle":
            centre = tri.mean(axis=0)
            dom = centre + (tri - centre) * (1.0 + margin)
        else:
            lo, hi = tri.min(axis=0), tri.max(axis=0)
            grow = (hi - lo) * margin
            lo, hi = lo - grow, hi + grow
            dom = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
        sl = cls(fa, np.stack([e0, e1]), dom, input_shape=shape, name=name)
        if name:
            return sl
        # a name to find it by once stored: its geometry's hash (stable, like the slice id)
        return cls(fa, sl.basis, dom, input_shape=shape, name=f"plane-{sl.content_hash[:8]}")

    # geometry -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of input values the slice lives in."""
        return int(self.origin.size)

    @property
    def area(self) -> float:
        """Area of the domain in u coordinates."""
        d = self.domain
        nxt = np.roll(d, -1, axis=0)
        return float(0.5 * np.sum(d[:, 0] * nxt[:, 1] - nxt[:, 0] * d[:, 1]))

    @property
    def diameter(self) -> float:
        """Largest distance between two domain vertices."""
        d = self.domain
        return float(np.max(np.linalg.norm(d[:, None, :] - d[None, :, :], axis=-1)))

    def lift(self, u: ArrayLike, *, shaped: bool = False) -> _F64:
        """Map slice coordinates ``u`` (n, 2) to inputs ``x`` (n, D), or (n, *input_shape)."""
        uu = np.asarray(u, dtype=np.float64).reshape(-1, 2)
        x = self.origin[None, :] + uu @ self.basis
        return x.reshape((-1, *self.input_shape)) if shaped else x

    def project(self, x: ArrayLike) -> tuple[_F64, _F64]:
        """Orthogonal projection of inputs onto the plane: ``(u, distance_to_plane)``."""
        xx = np.asarray(x, dtype=np.float64).reshape(-1, self.dim) - self.origin[None, :]
        gram = self.basis @ self.basis.T
        u = np.linalg.solve(gram, self.basis @ xx.T).T
        resid = xx - u @ self.basis
        return np.asarray(u, dtype=np.float64), np.linalg.norm(resid, axis=1).astype(np.float64)

    # identity -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description; ``Slice.from_dict`` inverts it exactly."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "origin": self.origin.tolist(),
            "basis": self.basis.tolist(),
            "domain": self.domain.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Slice:
        """Rebuild a slice written by :meth:`to_dict`."""
        try:
            return cls(
                data["origin"],
                data["basis"],
                data["domain"],
                input_shape=data.get("input_shape"),
                name=data.get("name", ""),
            )
        except KeyError as exc:
            raise InvalidSliceError(f"slice description lacks the key {exc.args[0]!r}.") from None

    @property
    def content_hash(self) -> str:
        """SHA-256 of the geometry (origin, basis, domain, shape), independent of the name."""
        h = hashlib.sha256()
        h.update(json.dumps(list(self.input_shape)).encode())
        for arr in (self.origin, self.basis, self.domain):
            h.update(np.ascontiguousarray(arr, dtype="<f8").tobytes())
        return h.hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Slice) and other.content_hash == self.content_hash

    def __hash__(self) -> int:
        return hash(self.content_hash)

    def __repr__(self) -> str:
        return (
            f"Slice(name={self.name!r}, dim={self.dim}, input_shape={self.input_shape}, "
            f"domain={len(self.domain)} vertices, area={self.area:.6g})"
        )
