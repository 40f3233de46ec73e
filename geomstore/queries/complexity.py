"""Exact local complexity on a slice (Humayun et al.): neurons whose boundary meets a
neighbourhood of each point, regions meeting it, and boundary length per area."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from geomstore.errors import GeomstoreError
from geomstore.queries.stats import resolve_partitions
from geomstore.store.store import Store

__all__ = ["clipped_length", "local_complexity"]

_SHAPES = ("disk", "diamond")


def clipped_length(
    a: np.ndarray, b: np.ndarray, c: np.ndarray, r: float, shape: str = "disk"
) -> np.ndarray:
    """Exact length of segments [a, b] inside the disk (or L1 diamond) of radius r at c."""
    d = b - a
    f = a - c
    if shape == "disk":
        qa = (d * d).sum(1)
        qb = 2 * (f * d).sum(1)
        qc = (f * f).sum(1) - r * r
        disc = qb * qb - 4 * qa * qc
        ok = (disc > 0) & (qa > 0)
        sq = np.sqrt(np.where(ok, disc, 0.0))
        safe = np.where(qa > 0, qa, 1.0)
        t0 = np.clip((-qb - sq) / (2 * safe), 0, 1)
        t1 = np.clip((-qb + sq) / (2 * safe), 0, 1)
        return np.where(ok, (t1 - t0) * np.sqrt(qa), 0.0)
    # diamond |x| + |y| <= r: clip by its four half-planes (Cyrus-Beck)
    lo = np.zeros(len(a))
    hi = np.ones(len(a))
    for nx, ny in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        num = r - (nx * f[:, 0] + ny * f[:, 1])
        den = nx * d[:, 0] + ny * d[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = num / den
        lo = np.where(den < 0, np.maximum(lo, t), lo)
        hi = np.where(den > 0, np.minimum(hi, t), hi)
        lo = np.where((den == 0) & (num < 0), 2.0, lo)
    return np.where(hi > lo, (hi - lo) * np.linalg.norm(d, axis=1), 0.0)


def local_complexity(
    store: Store,
    *,
    model: str,
    points: np.ndarray | str,
    radius: float,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
    shape: str = "disk",
) -> pa.Table:
    """Local complexity at points, for every checkpoint of a model on one slice.

    Parameters
    ----------
    points : array (n, 2) of slice coordinates, or the name of a stored dataset
    radius : float
        Radius of the neighbourhood in slice coordinates.
    shape : {"disk", "diamond"}

    Returns
    -------
    pyarrow.Table with checkpoint, step, point_id, split, n_neurons (distinct neurons whose
    edges meet the neighbourhood), neurons_per_layer (list), n_regions (regions meeting it)
    and boundary_density (edge length inside / area of the neighbourhood).
    """
    if shape not in _SHAPES:
        raise GeomstoreError(f"shape must be one of {_SHAPES}; got {shape!r}.")
    if not radius > 0:
        raise GeomstoreError(f"radius must be > 0; got {radius!r}.")
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    u, split = _points(store, points, parts.column("slice_id")[0].as_py())
    pts = pa.table({"point_id": np.arange(len(u), dtype=np.int64), "pu0": u[:, 0], "pu1": u[:, 1]})
    ids = parts.column("partition_id").to_pylist()
    near = (
        "ST_DWithin(e.geometry, ST_Point(p.pu0, p.pu1), ?)"
        if shape == "disk"
        else "ST_Intersects(e.geometry, ST_GeomFromText(printf('POLYGON((%f %f, %f %f, %f %f, "
        "%f %f, %f %f))', p.pu0 + ?1, p.pu1, p.pu0, p.pu1 + ?1, p.pu0 - ?1, p.pu1, p.pu0, "
        "p.pu1 - ?1, p.pu0 + ?1, p.pu1)))"
    )
    con = store._reader()
    con.register("_gs_pts", pts)
    try:
        sql = (
            "SELECT list_position($ids, e.partition_id) - 1 AS pidx, p.point_id, e.layer, "
            "e.unit, e.region_left, "
            "e.region_right, e.u0_a, e.u1_a, e.u0_b, e.u1_b "
            "FROM edges e JOIN _gs_pts p ON "
            + near.replace("?1", "$r").replace("?", "$r")
            + " WHERE list_contains($ids, e.partition_id)"
        )
        hits = con.execute(sql, {"r": float(radius), "ids": ids}).to_arrow_table()
    finally:
        con.unregister("_gs_pts")
    return _assemble(parts, hits, u, split, radius, shape)


def _points(store: Store, points: Any, slice_id: str) -> tuple[np.ndarray, list[str | None]]:
    if isinstance(points, str):
        t = store.sql(
            "SELECT u0, u1, split FROM points JOIN datasets USING (dataset_id) "
            "WHERE datasets.name = ? AND datasets.slice_id = ? ORDER BY split, point_id",
            [points, slice_id],
            limit=10_000_000,
        ).table
        if t.num_rows == 0:
            raise GeomstoreError(
                f"no stored points named {points!r} on this slice; "
                "add them with store.add_points(name, slice, x)."
            )
        u = np.stack([t.column("u0").to_numpy(), t.column("u1").to_numpy()], 1)
        return u, t.column("split").to_pylist()
    u = np.asarray(points, dtype=np.float64)
    if u.ndim != 2 or u.shape[1] != 2 or not np.all(np.isfinite(u)):
        raise GeomstoreError(
            "points must be finite slice coordinates of shape (n, 2), or a "
            "stored dataset name; project inputs with slice.project(x)."
        )
    return u, [None] * len(u)


def _unique(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct int64 keys and the index of one occurrence of each (sort-based)."""
    order = np.argsort(keys, kind="stable")
    srt = keys[order]
    first = np.ones(len(srt), dtype=bool)
    first[1:] = srt[1:] != srt[:-1]
    return srt[first], order[first]


def _assemble(
    parts: pa.Table,
    hits: pa.Table,
    u: np.ndarray,
    split: list[str | None],
    radius: float,
    shape: str,
) -> pa.Table:
    area = np.pi * radius**2 if shape == "disk" else 2 * radius**2
    n = len(u)
    ids = parts.column("partition_id").to_pylist()
    k = len(ids)

    def col(t: pa.Table, name: str, fill: float = -1) -> np.ndarray:
        return np.asarray(t.column(name).fill_null(fill).to_numpy(zero_copy_only=False))

    hp = col(hits, "pidx").astype(np.int64)
    pt = col(hits, "point_id").astype(np.int64)
    layer = col(hits, "layer").astype(np.int64)
    unit = col(hits, "unit").astype(np.int64)
    a = np.stack([col(hits, "u0_a"), col(hits, "u1_a")], 1).astype(float)
    b = np.stack([col(hits, "u0_b"), col(hits, "u1_b")], 1).astype(float)
    c = u[pt]
    length = clipped_length(a, b, c, radius, shape) if len(hp) else np.zeros(0)
    # every segment is stored once (edges hold each shared segment once)
    cell = hp * n + pt
    density = np.bincount(cell, weights=length, minlength=k * n) / area
    neur = (layer >= 0) & (length > 0)
    n_layers = int(layer.max()) + 1 if neur.any() else 0
    # distinct (cell, unit) pairs via one int64 key: 1-D unique is fast, axis=0 is not
    span = int(unit.max()) + 1 if len(unit) else 1
    key, first = _unique(cell[neur] * span + unit[neur])
    n_neurons = np.bincount(key // span, minlength=k * n)
    per_layer = np.zeros((k * n, max(n_layers, 0)), dtype=np.int64)
    np.add.at(per_layer, (key // span, layer[neur][first]), 1)
    # A region meets the neighbourhood iff an edge of it does, or it holds all of it:
    # count the distinct regions beside the edges that meet it (at least the one region).
    met = length > 0
    left, right = col(hits, "region_left").astype(np.int64), col(hits, "region_right")
    right = right.astype(np.int64)
    both = right >= 0
    rspan = int(max(left.max(initial=0), right.max(initial=0))) + 1
    sides = np.concatenate(
        [cell[met] * rspan + left[met], cell[met & both] * rspan + right[met & both]]
    )
    regions = np.maximum(np.bincount(_unique(sides)[0] // rspan, minlength=k * n), 1)
    steps = parts.column("step").to_pylist()
    names = parts.column("checkpoint").to_pylist()
    return pa.table(
        {
            "checkpoint": pa.array([names[i // n] for i in range(k * n)]),
            "step": pa.array([steps[i // n] for i in range(k * n)], type=pa.int64()),
            "point_id": pa.array(np.tile(np.arange(n, dtype=np.int64), k)),
            "split": pa.array(split * k, type=pa.string()),
            "n_neurons": pa.array(n_neurons.astype(np.int64)),
            "neurons_per_layer": pa.array(per_layer.tolist(), type=pa.list_(pa.int64())),
            "n_regions": pa.array(regions.astype(np.int64)),
            "boundary_density": pa.array(density),
        }
    )
