"""Per-point queries: the region holding each point, distances (query 5), churn (query 8)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from geomstore.queries.complexity import _points
from geomstore.queries.stats import resolve_partitions
from geomstore.store.store import Store

__all__ = ["churn", "point_regions"]


def point_regions(
    store: Store,
    *,
    model: str,
    points: np.ndarray | str,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
) -> pa.Table:
    """For each point and checkpoint: its region, label, pattern, and its distances to the
    region's border and to the decision boundary (null where a partition has none).

    ``pattern`` is the packed activation pattern, or its 128-bit hash for models whose
    patterns are stored as hashes only (either identifies the region's pattern, so churn
    compares them across checkpoints of one model).

    Points on an edge are given the region with the lowest id among those holding them.
    """
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    u, split = _points(store, points, parts.column("slice_id")[0].as_py())
    pts = pa.table(
        {
            "point_id": np.arange(len(u), dtype=np.int64),
            "pu0": u[:, 0],
            "pu1": u[:, 1],
            "split": pa.array(split, type=pa.string()),
        }
    )
    ids = parts.column("partition_id").to_pylist()
    con = store.reader()
    con.register("_gs_pts", pts)
    try:
        table = con.execute(
            """
            WITH hold AS (
                SELECT r.partition_id, p.point_id, min(r.region_id) AS region_id
                FROM regions r JOIN _gs_pts p
                  ON ST_Intersects(r.geometry, ST_Point(p.pu0, p.pu1))
                WHERE list_contains($ids, r.partition_id)
                GROUP BY ALL),
            bd AS (
                SELECT b.partition_id, p.point_id,
                       min(ST_Distance(b.geometry, ST_Point(p.pu0, p.pu1))) AS d
                FROM boundary b, _gs_pts p
                WHERE list_contains($ids, b.partition_id)
                GROUP BY ALL)
            SELECT list_position($ids, h.partition_id) - 1 AS pidx, h.point_id, p.split,
                   h.region_id, r.label, coalesce(r.pattern, r.pattern_hash) AS pattern,
                   ST_Distance(ST_Boundary(r.geometry), ST_Point(p.pu0, p.pu1))
                       AS distance_to_border,
                   bd.d AS distance_to_boundary
            FROM hold h
            JOIN regions r ON r.partition_id = h.partition_id AND r.region_id = h.region_id
            JOIN _gs_pts p ON p.point_id = h.point_id
            LEFT JOIN bd ON bd.partition_id = h.partition_id AND bd.point_id = h.point_id
            ORDER BY pidx, h.point_id
            """,
            {"ids": ids},
        ).to_arrow_table()
    finally:
        con.unregister("_gs_pts")
    pidx = table.column("pidx").to_numpy()
    names = np.asarray(parts.column("checkpoint").to_pylist(), dtype=object)
    steps = parts.column("step").to_pylist()
    table = table.drop_columns(["pidx"])
    table = table.add_column(0, "step", pa.array([steps[i] for i in pidx], type=pa.int64()))
    return table.add_column(0, "checkpoint", pa.array(names[pidx].tolist()))


def churn(
    store: Store,
    *,
    model: str,
    points: np.ndarray | str,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
) -> pa.Table:
    """Share of points whose activation pattern (hence region) changes between consecutive
    checkpoints, and share whose predicted label changes.

    Columns: checkpoint, step, previous, pattern_churn, label_churn, n_points.
    """
    t = point_regions(store, model=model, points=points, slice=slice, checkpoints=checkpoints)
    rows = t.select(["checkpoint", "step", "point_id", "pattern", "label"]).to_pylist()
    by_ck: dict[str, dict[int, tuple[bytes, int]]] = {}
    order: list[tuple[str, int]] = []
    for r in rows:
        if r["checkpoint"] not in by_ck:
            by_ck[r["checkpoint"]] = {}
            order.append((r["checkpoint"], r["step"]))
        by_ck[r["checkpoint"]][r["point_id"]] = (r["pattern"], r["label"])
    out = []
    for (prev, _), (cur, step) in itertools.pairwise(order):
        a, b = by_ck[prev], by_ck[cur]
        common = sorted(set(a) & set(b))
        n = len(common)
        pc = sum(a[i][0] != b[i][0] for i in common) / n if n else float("nan")
        lc = sum(a[i][1] != b[i][1] for i in common) / n if n else float("nan")
        out.append(
            {
                "checkpoint": cur,
                "step": step,
                "previous": prev,
                "pattern_churn": pc,
                "label_churn": lc,
                "n_points": n,
            }
        )
    return (
        pa.Table.from_pylist(out)
        if out
        else pa.table(
            {
                "checkpoint": pa.array([], pa.string()),
                "step": pa.array([], pa.int64()),
                "previous": pa.array([], pa.string()),
                "pattern_churn": pa.array([], pa.float64()),
                "label_churn": pa.array([], pa.float64()),
                "n_points": pa.array([], pa.int64()),
            }
        )
    )
