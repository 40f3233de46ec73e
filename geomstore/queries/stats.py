"""Choosing partitions by model, slice and checkpoints; partition statistics per checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import shapely

from geomstore.errors import NotFoundError, StoreError
from geomstore.store.store import Store

__all__ = ["partition_stats", "resolve_partitions"]


def resolve_partitions(
    store: Store,
    *,
    model: str,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
) -> pa.Table:
    """Partitions of ``model`` (by name) on one slice (name or id), ordered by step.

    The rows of :func:`~geomstore.queries.partitions` (partition_id, checkpoint, step,
    slice_id, metrics, ...). Raises :class:`~geomstore.errors.NotFoundError` for an unknown
    model, slice or checkpoint, and :class:`~geomstore.errors.StoreError` when the model has
    partitions on several slices and ``slice`` is not given.
    """
    from geomstore.queries.catalog import _model_names, choices, partitions

    known = _model_names(store)
    if model not in known:
        raise NotFoundError(
            f"no partitions of model {model!r}; models in this store: {sorted(known)}.",
            kind="model",
            name=model,
        )
    table = partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    if table.num_rows == 0:
        raise NotFoundError(
            f"no partitions of model {model!r}"
            + (f" on slice {slice!r}" if slice else "")
            + "; list them with store.partitions() or geomstore partitions STORE.",
            kind="partition",
            name=model,
        )
    if slice is None and len(set(table.column("slice_id").to_pylist())) > 1:
        names = sorted(set(table.column("slice").to_pylist()))
        raise StoreError(
            f"model {model!r} has partitions on several slices; pass slice= (--slice on the "
            f"command line); its slices: {choices(names)}."
        )
    return table


def eccentricity(wkb: Sequence[bytes]) -> np.ndarray:
    """Eccentricity sqrt(1 - l_min / l_max) of each polygon's second moments of area."""
    polys = shapely.from_wkb(np.asarray(wkb, dtype=object))
    coords, idx = shapely.get_coordinates(shapely.get_exterior_ring(polys), return_index=True)
    # shoelace terms per ring edge (rings are closed: drop the edge from the last point)
    nxt = np.roll(coords, -1, axis=0)
    same = np.roll(idx, -1) == idx
    x0, y0, x1, y1 = coords[:, 0], coords[:, 1], nxt[:, 0], nxt[:, 1]
    cr = np.where(same, x0 * y1 - x1 * y0, 0.0)
    n = len(polys)

    def acc(v: np.ndarray) -> np.ndarray:
        return np.bincount(idx, weights=v, minlength=n)

    area = acc(cr) / 2
    cx, cy = acc((x0 + x1) * cr) / (6 * area), acc((y0 + y1) * cr) / (6 * area)
    ixx = acc((y0 * y0 + y0 * y1 + y1 * y1) * cr) / 12 - area * cy * cy
    iyy = acc((x0 * x0 + x0 * x1 + x1 * x1) * cr) / 12 - area * cx * cx
    ixy = acc((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cr) / 24 - area * cx * cy
    mean = (ixx + iyy) / 2
    rad = np.sqrt(((ixx - iyy) / 2) ** 2 + ixy**2)
    lmax, lmin = mean + rad, np.maximum(mean - rad, 0.0)
    return np.sqrt(np.clip(1 - lmin / np.where(lmax > 0, lmax, 1.0), 0.0, 1.0))


def partition_stats(
    store: Store,
    *,
    model: str,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
) -> pa.Table:
    """SplineCam's partition statistics for every checkpoint, in DuckDB.

    Columns: checkpoint, step, n_regions, area_mean, area_std, area_q10/q50/q90,
    vertices_mean, slope_norm_mean/std/max, boundary_length, n_boundary_segments,
    edge_length (interior), eccentricity_mean/q50 (of each region's second moments of
    area: 0 for a disc-like region, towards 1 for a needle), metrics.

    Examples
    --------
    >>> # partition_stats(store, model="moons-mlp", slice="moons-plane")
    """
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    ids = parts.column("partition_id").to_pylist()
    sql = """
        WITH r AS (
            SELECT partition_id, count(*) AS n_regions, avg(area) AS area_mean,
                   stddev_pop(area) AS area_std,
                   quantile_cont(area, 0.1) AS area_q10, quantile_cont(area, 0.5) AS area_q50,
                   quantile_cont(area, 0.9) AS area_q90, avg(n_vertices) AS vertices_mean,
                   avg(slope_norm) AS slope_norm_mean, stddev_pop(slope_norm) AS slope_norm_std,
                   max(slope_norm) AS slope_norm_max
            FROM regions WHERE partition_id = ANY(?) GROUP BY partition_id),
        b AS (
            SELECT partition_id, coalesce(sum(length), 0) AS boundary_length,
                   count(*) AS n_boundary_segments
            FROM boundary WHERE partition_id = ANY(?) GROUP BY partition_id),
        e AS (
            SELECT partition_id, sum(length) AS edge_length
            FROM edges WHERE region_right IS NOT NULL AND partition_id = ANY(?)
            GROUP BY partition_id)
        SELECT r.*, coalesce(b.boundary_length, 0) AS boundary_length,
               coalesce(b.n_boundary_segments, 0) AS n_boundary_segments, e.edge_length
        FROM r LEFT JOIN b USING (partition_id) LEFT JOIN e USING (partition_id)
    """
    con = store.reader()
    stats = con.execute(sql, [ids, ids, ids]).to_arrow_table()
    by_id = {row["partition_id"]: row for row in stats.to_pylist()}
    rows = []
    for p in parts.to_pylist():
        s = dict(by_id[p["partition_id"]])
        s.pop("partition_id")
        wkb = (
            con.execute(
                "SELECT ST_AsWKB(geometry)::BLOB AS g FROM regions WHERE partition_id = ?",
                [p["partition_id"]],
            )
            .to_arrow_table()
            .column("g")
            .to_pylist()
        )
        ecc = eccentricity(wkb)
        s["eccentricity_mean"] = float(ecc.mean())
        s["eccentricity_q50"] = float(np.quantile(ecc, 0.5))
        rows.append(
            {"checkpoint": p["checkpoint"], "step": p["step"], **s, "metrics": p["metrics"]}
        )
    # typed from the query's own columns: a column null in every row keeps its type
    fields = [("checkpoint", pa.string()), ("step", pa.int64())]
    fields += [(f.name, f.type) for f in stats.schema if f.name != "partition_id"]
    fields += [("eccentricity_mean", pa.float64()), ("eccentricity_q50", pa.float64())]
    fields += [("metrics", parts.schema.field("metrics").type)]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))
