"""Exact local complexity on a slice (Humayun et al.): neurons whose boundary meets a
neighbourhood of each point, regions meeting it, and neuron boundary length per area.

The stored edges hold the zero sets of the *hidden* units (the cuts of every nonlinearity)
and the domain's border; they do not hold the zero sets of the output units (the logits),
which cut no region, nor does the ``boundary`` table (it holds where the top two logits
tie). With ``layers="all"`` the logits' zero sets are computed here from the regions'
stored affine maps ``A u + c``: inside each region the zero set of logit ``j`` is the line
``A[j] u + c[j] = 0`` clipped to the region's polygon.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa

from geomstore.errors import GeomstoreError
from geomstore.queries.logits import PIDX, logit_segments
from geomstore.queries.stats import resolve_partitions
from geomstore.store.sqlutil import sql_in
from geomstore.store.store import Store

__all__ = [
    "LCArgumentError",
    "Layers",
    "Shape",
    "architectures",
    "clipped_length",
    "in_domain",
    "local_complexity",
]

Shape = Literal["disk", "diamond"]
"""Neighbourhood of a point: the Euclidean disk or the L1 diamond ``|u0| + |u1| <= r``."""
Layers = Literal["hidden", "all"]
"""Which units count: the hidden nonlinearities' units, or those and the output units."""

_SHAPES: tuple[str, ...] = get_args(Shape)
_LAYERS: tuple[str, ...] = get_args(Layers)
_BITMAP_MAX = 1 << 27  # distinct (cell, unit) pairs by a bitmap up to this many bits
_BATCH = 1 << 16  # segments per batch (about 5 candidate points each at 10k regions)
_CANDIDATES = 1 << 19  # (segment, point) candidates processed at a time


class LCArgumentError(GeomstoreError, ValueError):
    """An argument of a local-complexity query is out of its domain."""


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise :class:`LCArgumentError` naming the valid choices unless ``value`` is one."""
    if value not in choices:
        raise LCArgumentError(f"{name} must be one of {choices}; got {value!r}.")


def clipped_length(
    a: np.ndarray, b: np.ndarray, c: np.ndarray, r: float, shape: Shape = "disk"
) -> np.ndarray:
    """Exact length of segments [a, b] inside the disk (or L1 diamond) of radius r at c.

    ``a``, ``b`` and ``c`` are (n, 2) arrays of points (``c`` may be one point); float64.

    Examples
    --------
    >>> import numpy as np
    >>> a, b, c = np.array([[-2.0, 0.0]]), np.array([[2.0, 0.0]]), np.zeros((1, 2))
    >>> clipped_length(a, b, c, 1.0), clipped_length(a, b, c, 1.0, "diamond")
    (array([2.]), array([2.]))
    """
    check_choice("shape", shape, _SHAPES)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    c = np.broadcast_to(np.asarray(c, dtype=np.float64), a.shape)
    return _clipped(a[:, 0], a[:, 1], b[:, 0], b[:, 1], c[:, 0], c[:, 1], r, shape)


def _clipped(
    ax: np.ndarray,
    ay: np.ndarray,
    bx: np.ndarray,
    by: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    r: float,
    shape: str,
) -> np.ndarray:
    """:func:`clipped_length` on coordinate columns (no (n, 2) temporaries: the hot path)."""
    dx, dy = bx - ax, by - ay
    fx, fy = ax - cx, ay - cy
    if shape == "disk":
        # |f + t d| = r: qa t^2 + qb t + qc = 0, kept to the segment's t in [0, 1]
        qa = dx * dx
        qa += dy * dy
        qb = fx * dx
        qb += fy * dy
        qb *= 2
        qc = fx * fx
        qc += fy * fy
        qc -= r * r
        disc = qb * qb
        disc -= 4 * qa * qc
        ok = (disc > 0) & (qa > 0)
        sq = np.sqrt(np.where(ok, disc, 0.0))
        den = 2 * np.where(qa > 0, qa, 1.0)
        t0 = np.minimum(np.maximum((-qb - sq) / den, 0.0), 1.0)
        t1 = np.minimum(np.maximum((sq - qb) / den, 0.0), 1.0)
        t1 -= t0
        t1 *= np.sqrt(qa)
        return np.where(ok, t1, 0.0)
    # diamond |x| + |y| <= r: clip by its four half-planes (Cyrus-Beck)
    lo = np.zeros(len(ax))
    hi = np.ones(len(ax))
    empty = np.zeros(len(ax), dtype=bool)
    for nx, ny in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        num = r - (nx * fx + ny * fy)
        den = nx * dx + ny * dy
        with np.errstate(divide="ignore", invalid="ignore"):
            t = num / den
        np.maximum(lo, t, out=lo, where=den < 0)
        np.minimum(hi, t, out=hi, where=den > 0)
        empty |= (den == 0) & (num < 0)
    hi -= lo
    hi *= np.sqrt(dx * dx + dy * dy)
    return np.where((hi > 0) & ~empty, hi, 0.0)


def local_complexity(
    store: Store,
    *,
    model: str,
    points: np.ndarray | str,
    radius: float,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
    shape: Shape = "disk",
    layers: Layers = "hidden",
) -> pa.Table:
    """Local complexity at points, for every checkpoint of a model on one slice.

    A unit counts at a point when its zero set meets the neighbourhood in a piece of
    positive length (a zero set that only touches it at one point does not count).

    Parameters
    ----------
    points : array or str
        Slice coordinates (n, 2); or inputs (n, *input_shape), or flattened (n, D), which
        are projected orthogonally onto the slice (:meth:`~geomstore.Slice.project`); or
        the name of a stored dataset. An (n, 2) array is always read as slice coordinates,
        also for a model with two inputs.
    radius : float
        Radius of the neighbourhood in slice coordinates.
    shape : {"disk", "diamond"}
        The Euclidean disk, or the L1 diamond ``|u0 - p0| + |u1 - p1| <= radius``: the
        cross-polytope of :func:`~geomstore.queries.approximate_lc` with ``directions``
        the two slice axes, when the slice's basis is orthonormal.
    layers : {"hidden", "all"}
        ``"hidden"`` (the default) counts the units of the hidden nonlinearities (the
        stored edges). ``"all"`` also counts the output units, whose zero sets are computed
        from the regions' affine maps: this is what the reference code of Humayun et al.
        counts for the MLP figures of "Deep networks always grok" (it hooks every
        ``nn.Linear``, the logits included), and adds one entry to ``neurons_per_layer``.

    Returns
    -------
    pyarrow.Table
        checkpoint, step, point_id, split, n_neurons (distinct units whose zero sets meet
        the neighbourhood), neurons_per_layer (list: one entry per nonlinearity, then the
        output layer with ``layers="all"``), n_regions (regions meeting it) and
        boundary_density: the length inside the neighbourhood of the counted units' zero
        sets (not of the domain's border, which is no unit's boundary), divided by the
        whole neighbourhood's area, ``pi r^2`` for the disk and ``2 r^2`` for the diamond,
        also where part of it lies outside the domain (as the papers normalise: by the
        neighbourhood of radius r around the point). Outside the domain no zero set is
        known, so there the neighbourhood adds area but no length.

        Only the part of a neighbourhood inside the slice's domain is seen. A neighbourhood
        that does not meet the domain (its point lies outside, and no edge or piece of the
        border crosses it) has null n_neurons, neurons_per_layer, n_regions and
        boundary_density: the partition says nothing there.

    Examples
    --------
    >>> import tempfile, numpy as np, torch, geomstore
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> part = geomstore.partition(net, geomstore.Slice.box((-1, -1), (1, 1)), device="cpu")
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     _ = store.add(part, model="toy", checkpoint="init", step=0)
    ...     lc = local_complexity(store, model="toy", points=np.zeros((1, 2)), radius=0.5,
    ...                           layers="all")
    >>> row = lc.to_pylist()[0]
    >>> sum(row["neurons_per_layer"]) == row["n_neurons"], len(row["neurons_per_layer"])
    (True, 2)
    """
    check_choice("shape", shape, _SHAPES)
    check_choice("layers", layers, _LAYERS)
    if not (isinstance(radius, (int, float, np.floating)) and np.isfinite(radius) and radius > 0):
        raise LCArgumentError(f"radius must be a finite number > 0; got {radius!r}.")
    radius = float(radius)
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    con = store.reader()
    slice_id = parts.column("slice_id")[0].as_py()
    u, split = _points(store, points, slice_id)
    ids = parts.column("partition_id").to_pylist()
    ids_in = sql_in(ids)
    units, n_outputs, max_region = _architecture(store, parts)
    if layers == "all":
        units = [*units, n_outputs]
    tally = _Tally(u, len(ids), units, max_region + 1, radius, shape)
    grid = _PointGrid(u, radius)
    # the partition ids go in as a parameter: registering an Arrow table would import
    # pyarrow.dataset (a third of a second) on a process's first query
    edges = con.execute(
        f"SELECT {PIDX}, coalesce(e.unit, -1)::INTEGER AS unit, "
        "coalesce(e.region_left, -1)::INTEGER AS rl, coalesce(e.region_right, -1)::INTEGER"
        " AS rr, e.u0_a, e.u1_a, e.u0_b, e.u1_b FROM edges e "
        f"WHERE e.partition_id IN {ids_in}",
        {"ids": ids},
    ).to_arrow_reader(_BATCH)
    for batch in edges:  # small batches: numpy's temporaries stay in cache
        store.reader()  # raises once a deadline the caller set has passed (the service's)
        tally.add(grid, *(np.asarray(c.to_numpy()) for c in batch.columns))
    if layers == "all":
        segs = logit_segments(con, ids, sum(units[:-1]), n_outputs)
        none = np.full(segs.num_rows, -1, dtype=np.int32)
        for batch in segs.to_batches(_BATCH):
            store.reader()
            c = [np.asarray(x.to_numpy()) for x in batch.columns]
            tally.add(grid, c[0], c[1], none[: len(c[0])], none[: len(c[0])], *c[2:])
    return tally.table(parts, split, in_domain(store.load_slice(slice_id), u))


class _PointGrid:
    """Points bucketed in a uniform grid: the points near a segment in a few index ranges.

    Cells are half the radius wide (at most about a million cells), and points are sorted
    by (row, column), so the points of one row of cells between two columns are one
    contiguous range: a segment's candidates are the rows its box, widened by the radius,
    covers. The candidates hold every point within the radius; the exact test is
    :func:`clipped_length`.
    """

    def __init__(self, u: np.ndarray, radius: float) -> None:
        lo, hi = u.min(axis=0) if len(u) else np.zeros(2), u.max(axis=0) if len(u) else np.ones(2)
        self.size = max(radius / 2, float((hi - lo).max()) / 1000, 1e-300)
        self.x0, self.y0 = float(lo[0]), float(lo[1])
        self.nc = int((hi[0] - lo[0]) / self.size) + 1
        self.nr = int((hi[1] - lo[1]) / self.size) + 1
        self.radius = radius
        col = np.minimum(((u[:, 0] - self.x0) / self.size).astype(np.int64), self.nc - 1)
        row = np.minimum(((u[:, 1] - self.y0) / self.size).astype(np.int64), self.nr - 1)
        key = row * self.nc + col
        self.order = np.argsort(key, kind="stable")
        self.start = np.searchsorted(key[self.order], np.arange(self.nr * self.nc + 1))

    def pairs(
        self, ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray, limit: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Candidate (segment, point) pairs, at most about ``limit`` at a time: every point
        within the radius of each segment."""
        r, g = self.radius * (1 + 1e-9), self.size  # widened: rounding drops no candidate
        x_lo = (np.minimum(ax, bx) - r - self.x0) / g
        x_hi = (np.maximum(ax, bx) + r - self.x0) / g
        y_lo = (np.minimum(ay, by) - r - self.y0) / g
        y_hi = (np.maximum(ay, by) + r - self.y0) / g
        seg = np.flatnonzero((x_hi >= 0) & (x_lo < self.nc) & (y_hi >= 0) & (y_lo < self.nr))
        c0 = np.clip(x_lo[seg], 0, self.nc - 1).astype(np.int64)
        c1 = np.clip(x_hi[seg], 0, self.nc - 1).astype(np.int64)
        r0 = np.clip(y_lo[seg], 0, self.nr - 1).astype(np.int64)
        rows = np.clip(y_hi[seg], 0, self.nr - 1).astype(np.int64) - r0 + 1
        # one (segment, row of cells) pair per row its widened box covers
        which = np.repeat(np.arange(len(seg)), rows)
        row = r0[which] + _ramp(rows)
        lo = self.start[row * self.nc + c0[which]]
        count = self.start[row * self.nc + c1[which] + 1] - lo
        # a large radius meets many points per segment: expand the ranges in pieces
        ends = np.cumsum(count)
        cuts = np.searchsorted(ends, np.arange(limit, int(ends[-1]) if len(ends) else 0, limit))
        for a, b in itertools.pairwise([0, *np.unique(cuts).tolist(), len(lo)]):
            if b == a:
                continue
            take = a + np.repeat(np.arange(b - a), count[a:b])
            pos = lo[take] + _ramp(count[a:b])
            yield seg[which[take]], self.order[pos]


def _ramp(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., c - 1 for each count c, concatenated."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)


def _points(store: Store, points: Any, slice_id: str) -> tuple[np.ndarray, list[str | None]]:
    """Points as (n, 2) slice coordinates and their splits (a stored dataset, or an array)."""
    if isinstance(points, str):
        t = (
            store.reader()
            .execute(
                "SELECT u0, u1, split FROM points JOIN datasets USING (dataset_id) "
                "WHERE datasets.name = ? AND datasets.slice_id = ? ORDER BY split, point_id",
                [points, slice_id],
            )
            .to_arrow_table()
        )
        if t.num_rows == 0:
            from geomstore.queries.catalog import missing_dataset

            raise missing_dataset(store, points, slice_id)
        u = np.stack([t.column("u0").to_numpy(), t.column("u1").to_numpy()], 1)
        return u.astype(np.float64), t.column("split").to_pylist()
    try:
        u = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        u = np.empty((0, 0))
    if not (u.ndim == 2 and u.shape[1] == 2):
        u = _project(store, u, slice_id)
    if not np.all(np.isfinite(u)):
        raise LCArgumentError("points must be finite; got NaN or infinite coordinates.")
    return u, [None] * len(u)


def in_domain(slice: Any, u: np.ndarray) -> np.ndarray:
    """Whether each point (n, 2) lies in the slice's domain, its border included."""
    import shapely

    domain = shapely.Polygon(np.asarray(slice.domain, dtype=np.float64))
    return np.asarray(shapely.intersects_xy(domain, u[:, 0], u[:, 1]), dtype=bool)


def _project(store: Store, x: np.ndarray, slice_id: str) -> np.ndarray:
    """Inputs ``x`` (..., *input_shape) or (..., D) projected onto the slice: (n, 2)."""
    sl = store.load_slice(slice_id)
    shape = tuple(int(d) for d in sl.input_shape)
    k = len(shape)
    if x.ndim >= k and x.ndim > 0 and tuple(x.shape[x.ndim - k :]) == shape:
        return np.asarray(sl.project(x.reshape(-1, sl.dim))[0], dtype=np.float64)
    if x.ndim >= 1 and x.shape[-1] == sl.dim:
        return np.asarray(sl.project(x.reshape(-1, sl.dim))[0], dtype=np.float64)
    raise LCArgumentError(
        f"points must be slice coordinates of shape (n, 2), inputs of shape (n, "
        f"{', '.join(map(str, shape))}) or (n, {sl.dim}) to project onto the slice, or a "
        f"stored dataset name; got an array of shape {x.shape}."
    )


def architectures(store: Store, parts: pa.Table) -> list[tuple[tuple[int, ...], int]]:
    """Each partition's (units per nonlinearity, number of outputs), in the rows' order.

    Checkpoints of one model name may hold different architectures (a model row each).
    """
    from geomstore.queries.catalog import models

    arch = {
        m["model_id"]: (
            tuple(int(x) for x in json.loads(m["units_per_layer"] or "[]")),
            int(m["n_outputs"] or 0),
        )
        for m in models(store).select(["model_id", "units_per_layer", "n_outputs"]).to_pylist()
    }
    return [arch[m] for m in parts.column("model_id").to_pylist()]


#: Why checkpoints of different architectures cannot be tallied (or patterns compared).
MIXED_LAYERS = (
    "the chosen checkpoints come from models with different layers; "
    "pass checkpoints= (-c/--checkpoint on the command line) of one architecture."
)


def _architecture(store: Store, parts: pa.Table) -> tuple[list[int], int, int]:
    """Units per nonlinearity, number of outputs and largest region id of the partitions."""
    shapes = set(architectures(store, parts))
    if len(shapes) != 1:
        raise LCArgumentError(MIXED_LAYERS)
    units, k = shapes.pop()
    most = max(int(n or 0) for n in parts.column("n_regions").to_pylist())
    return list(units), k, most - 1


def _distinct(keys: np.ndarray, span: int) -> np.ndarray:
    """Sorted distinct non-negative int64 keys below ``span``: a bitmap when it is small."""
    if span <= _BITMAP_MAX:
        mark = np.zeros(span, dtype=bool)
        mark[keys] = True
        return np.flatnonzero(mark)
    srt = np.sort(keys)
    first = np.ones(len(srt), dtype=bool)
    first[1:] = srt[1:] != srt[:-1]
    return srt[first]


class _Tally:
    """Local complexity accumulated over batches of (edge, point) candidates."""

    def __init__(
        self, u: np.ndarray, k: int, units: list[int], rspan: int, radius: float, shape: str
    ) -> None:
        self.u0, self.u1 = np.ascontiguousarray(u[:, 0]), np.ascontiguousarray(u[:, 1])
        self.n, self.k, self.units = len(u), k, units
        self.cells = k * len(u)
        self.radius, self.shape = radius, shape
        self.offsets = np.concatenate([[0], np.cumsum(units)]).astype(np.int64)
        self.span = max(int(self.offsets[-1]), 1)
        self.rspan = max(rspan, 1)
        self.length = np.zeros(self.cells)
        self.touched = np.zeros(self.cells, dtype=bool)  # some edge meets the neighbourhood
        bits = self.cells * self.span
        self.mark = np.zeros(bits, dtype=bool) if bits <= _BITMAP_MAX else None
        self.unit_keys: list[np.ndarray] = []
        self.side_keys: list[np.ndarray] = []

    def add(
        self,
        grid: _PointGrid,
        pidx: np.ndarray,
        unit: np.ndarray,
        left: np.ndarray,
        right: np.ndarray,
        ax: np.ndarray,
        ay: np.ndarray,
        bx: np.ndarray,
        by: np.ndarray,
    ) -> None:
        """Clip a batch of segments to the neighbourhoods near them; note units, regions,
        lengths."""
        # a point nearer a segment than r lies within r + half its length of its middle:
        # a cheap test that drops about half of the grid's candidates
        mx, my = (ax + bx) / 2, (ay + by) / 2
        reach = np.hypot(bx - ax, by - ay) / 2 + self.radius
        reach *= reach * (1 + 1e-9)
        for seg, pt in grid.pairs(ax, ay, bx, by, _CANDIDATES):
            dx, dy = self.u0[pt] - mx[seg], self.u1[pt] - my[seg]
            near = dx * dx + dy * dy <= reach[seg]
            self._add(seg[near], pt[near], pidx, unit, left, right, ax, ay, bx, by)

    def _add(
        self,
        seg: np.ndarray,
        pt: np.ndarray,
        pidx: np.ndarray,
        unit: np.ndarray,
        left: np.ndarray,
        right: np.ndarray,
        ax: np.ndarray,
        ay: np.ndarray,
        bx: np.ndarray,
        by: np.ndarray,
    ) -> None:
        cell = pidx[seg].astype(np.int64) * self.n + pt
        length = _clipped(
            ax[seg], ay[seg], bx[seg], by[seg], self.u0[pt], self.u1[pt], self.radius, self.shape
        )
        unit, left, right = unit[seg], left[seg], right[seg]
        # every segment is stored once (edges hold each shared segment once)
        met = length > 0
        self.touched[cell[met]] = True
        # the domain's border (unit -1) bounds regions but is no unit's zero set: no length
        zero_set = unit >= 0
        self.length += np.bincount(cell[zero_set], weights=length[zero_set], minlength=self.cells)
        neur = met & (unit >= 0) & (unit < self.span)
        keys = cell[neur] * self.span + unit[neur]
        if self.mark is not None:
            self.mark[keys] = True
        else:
            self.unit_keys.append(_distinct(keys, 1 << 62))
        # A region meets the neighbourhood iff an edge of it does, or it holds all of it:
        # the distinct regions beside the edges that meet it (at least the one region).
        if max(left.max(initial=-1), right.max(initial=-1)) >= self.rspan:
            raise GeomstoreError(
                "an edge names a region beyond its partition's n_regions: the store is "
                "inconsistent; recompute that partition."
            )
        lm, rm = met & (left >= 0), met & (right >= 0)
        sides = np.concatenate(
            [cell[lm] * self.rspan + left[lm], cell[rm] * self.rspan + right[rm]]
        )
        self.side_keys.append(_distinct(sides, 1 << 62))

    def table(self, parts: pa.Table, split: list[str | None], inside: np.ndarray) -> pa.Table:
        """The result rows: one per checkpoint and point (``inside``: the points in the
        domain). A neighbourhood meets the domain when its point lies in it or an edge (a
        zero set or the border) crosses it; one that misses it has null counts."""
        cells, n, k, n_layers = self.cells, self.n, self.k, len(self.units)
        if self.mark is not None:
            key = np.flatnonzero(self.mark)
        else:
            key = _distinct(np.concatenate([np.zeros(0, np.int64), *self.unit_keys]), 1 << 62)
        layer = np.searchsorted(self.offsets, key % self.span, side="right") - 1
        per_layer = np.bincount((key // self.span) * n_layers + layer, minlength=cells * n_layers)
        sides = _distinct(np.concatenate([np.zeros(0, np.int64), *self.side_keys]), 1 << 62)
        regions = np.maximum(np.bincount(sides // self.rspan, minlength=cells), 1)
        missed = ~(self.touched | np.tile(np.asarray(inside, dtype=bool), k))
        area = np.pi * self.radius**2 if self.shape == "disk" else 2 * self.radius**2
        names = np.array(parts.column("checkpoint").to_pylist(), dtype=object)
        steps = np.array(parts.column("step").to_pylist(), dtype=object)
        return pa.table(
            {
                "checkpoint": pa.array(np.repeat(names, n), type=pa.string()),
                "step": pa.array(np.repeat(steps, n), type=pa.int64()),
                "point_id": pa.array(np.tile(np.arange(n, dtype=np.int64), k)),
                "split": pa.array(split * k, type=pa.string()),
                "n_neurons": pa.array(
                    per_layer.reshape(cells, n_layers).sum(1).astype(np.int64), mask=missed
                ),
                "neurons_per_layer": pa.ListArray.from_arrays(
                    pa.array(np.arange(cells + 1, dtype=np.int32) * n_layers),
                    pa.array(per_layer.astype(np.int64)),
                    mask=pa.array(missed),
                ),
                "n_regions": pa.array(regions.astype(np.int64), mask=missed),
                "boundary_density": pa.array(self.length / area, mask=missed),
            }
        )
