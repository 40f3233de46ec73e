"""Per-point queries: the region holding each point, distances (query 5), churn (query 8)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geomstore.queries.agreement import CompareArgumentError, require_two
from geomstore.queries.complexity import _points, architectures
from geomstore.queries.stats import resolve_partitions
from geomstore.store.sqlutil import sql_in
from geomstore.store.store import Store

__all__ = ["churn", "point_regions"]


def point_regions(
    store: Store,
    *,
    model: str,
    points: np.ndarray | str,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
    affine: bool = False,
) -> pa.Table:
    """For each point and checkpoint: its region, label, pattern, and its distances to the
    region's border and to the decision boundary (null where a partition has none).

    ``label`` is the predicted class at the point: the region's affine map ``A u + c``
    evaluated there, its argmax (ties go to the lowest class index) or, for a model with
    one output, whether it exceeds the partition's threshold. It is the convention of the
    regions' own ``label`` (taken at the centroid), applied at the point, so it differs
    from the region's label where the decision boundary crosses the region.

    ``pattern`` is the packed activation pattern, or its 128-bit hash for models whose
    patterns are stored as hashes only (either identifies the region's pattern, so churn
    compares them across checkpoints of one model). With ``affine=True`` the rows also
    hold the partition id, the region's affine map (``A`` row-major K x 2, ``c``) and its
    stored pattern hash, read in the same scan.

    Points on an edge are given the region with the lowest id among those holding them.

    Every point has one row per checkpoint, in the order given (``point_id`` is its index).
    A point outside the slice's domain lies in no region: its region_id, label, pattern
    and distances (and with ``affine=True`` its A, c and pattern hash) are null.
    """
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    u, split = _points(store, points, parts.column("slice_id")[0].as_py())
    ids = parts.column("partition_id").to_pylist()
    ids_in = sql_in(ids)
    extra = ", partition_id := r.partition_id, ph := r.pattern_hash"
    out = ", g.partition_id, h.h.ph AS pattern_hash"
    # the points go in as list parameters and the partitions as a literal list: the filter
    # then reaches the scans (one of regions, one of boundary), which skip other partitions.
    # Each list travels as the text of its floats (repr: shortest round trip, parsed back
    # bit for bit): a Python list parameter costs ~50 us a float to bind, uninterruptibly.
    sql = f"""
        WITH p AS (
            SELECT unnest(range(len($pu0::DOUBLE[]))) AS point_id,
                   unnest($pu0::DOUBLE[]) AS pu0, unnest($pu1::DOUBLE[]) AS pu1),
        hold AS (
            SELECT r.partition_id, p.point_id,
                   arg_min(struct_pack(
                       region_id := r.region_id, A := r.A, c := r.c,
                       pattern := coalesce(r.pattern, r.pattern_hash),
                       border := ST_Distance(ST_Boundary(r.geometry), ST_Point(p.pu0, p.pu1))
                       {extra if affine else ""}), r.region_id) AS h
            FROM regions r JOIN p ON ST_Intersects(r.geometry, ST_Point(p.pu0, p.pu1))
            WHERE r.partition_id IN {ids_in}
            GROUP BY ALL),
        bd AS (
            SELECT b.partition_id, p.point_id,
                   min(ST_Distance(b.geometry, ST_Point(p.pu0, p.pu1))) AS d
            FROM boundary b, p
            WHERE b.partition_id IN {ids_in}
            GROUP BY ALL),
        grid AS (  -- every (checkpoint, point): a point outside the domain has no region
            SELECT k.pidx, $ids[k.pidx + 1] AS partition_id, p.point_id
            FROM (SELECT unnest(range(len($ids))) AS pidx) k, p)
        SELECT g.pidx, g.point_id,
               h.h.region_id AS region_id, h.h.A AS A, h.h.c AS c, h.h.pattern AS pattern,
               h.h.border AS distance_to_border,
               CASE WHEN h.point_id IS NOT NULL THEN bd.d END AS distance_to_boundary
               {out if affine else ""}
        FROM grid g
        LEFT JOIN hold h ON h.partition_id = g.partition_id AND h.point_id = g.point_id
        LEFT JOIN bd ON bd.partition_id = g.partition_id AND bd.point_id = g.point_id
        ORDER BY g.pidx, g.point_id
    """
    params = {"ids": ids, "pu0": repr(u[:, 0].tolist()), "pu1": repr(u[:, 1].tolist())}
    table = store.reader().execute(sql, params).to_arrow_table()
    pidx = table.column("pidx").to_numpy()
    point_id = table.column("point_id").to_numpy()
    names = np.asarray(parts.column("checkpoint").to_pylist(), dtype=object)
    steps = parts.column("step").to_pylist()
    label = _label_at(table, u[point_id], _thresholds(store, ids)[pidx])
    table = table.drop_columns(["pidx"])
    at = table.schema.get_field_index("A")
    amap, cvec = table.column("A"), table.column("c")
    table = table.drop_columns(["A", "c"]).add_column(at, "label", label)
    if affine:
        at = table.schema.get_field_index("partition_id") + 1
        table = table.add_column(at, "A", amap).add_column(at + 1, "c", cvec)
    table = table.add_column(
        1, "split", pa.array([split[i] for i in point_id.tolist()], type=pa.string())
    )
    table = table.add_column(0, "step", pa.array([steps[i] for i in pidx], type=pa.int64()))
    return table.add_column(0, "checkpoint", pa.array(names[pidx].tolist()))


def _label_at(table: pa.Table, u: np.ndarray, threshold: np.ndarray) -> pa.Array:
    """The predicted class at each point from its region's affine map (rows of ``table``;
    null where the point lies in no region).

    As the regions' ``label``: the argmax of ``A u + c`` (the first, i.e. the lowest class,
    on a tie) with several outputs, ``A u + c > threshold`` with one. The checkpoints of
    one model name may differ in their number of outputs: rows are taken by it.
    """
    cs = table.column("c").combine_chunks()
    amap = table.column("A").combine_chunks()
    held = np.asarray(cs.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    k_row = np.asarray(pc.list_value_length(cs).fill_null(0).to_numpy(), dtype=np.int64)
    label = np.zeros(len(held), dtype=np.int32)
    for k in np.unique(k_row[held]).tolist():
        rows = np.flatnonzero(held & (k_row == k))
        take = pa.array(rows)
        c = np.asarray(cs.take(take).flatten().to_numpy(), np.float64).reshape(-1, k)
        a = np.asarray(amap.take(take).flatten().to_numpy(), np.float64).reshape(-1, k, 2)
        out = a[:, :, 0] * u[rows, :1] + a[:, :, 1] * u[rows, 1:] + c
        if k == 1:
            label[rows] = out[:, 0] > threshold[rows]
        else:
            label[rows] = out.argmax(axis=1)
    return pa.array(label, pa.int32(), mask=~held)


def _thresholds(store: Store, ids: list[str]) -> np.ndarray:
    """Each partition's ``threshold`` setting (one-output models), in the order of ``ids``."""
    rows = dict(
        store.reader()
        .execute(
            f"SELECT partition_id, settings FROM partitions WHERE partition_id IN {sql_in(ids)}"
        )
        .fetchall()
    )
    out = []
    for i in ids:
        settings = json.loads(rows.get(i) or "{}")
        out.append(float(settings.get("threshold") or 0.0))
    return np.asarray(out, dtype=np.float64)


def churn(
    store: Store,
    *,
    model: str,
    points: np.ndarray | str,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
) -> pa.Table:
    """Share of points whose activation pattern (hence region) changes between consecutive
    checkpoints, and share whose label (the predicted class at the point, as in
    :func:`point_regions`) changes.

    Columns: checkpoint, step, previous, pattern_churn, label_churn, n_points (the points
    compared: those inside the slice's domain, which lie in a region). Fewer than two
    checkpoints raise :class:`~geomstore.queries.CompareArgumentError`.

    Checkpoints of one model name may hold different architectures. Where two consecutive
    ones differ in their hidden layers, their activation patterns are not comparable and
    ``pattern_churn`` is null, while ``label_churn`` is still given (as
    :func:`~geomstore.queries.agreement_over` compares their classes); a different number
    of outputs raises :class:`~geomstore.queries.CompareArgumentError`, as there.
    """
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    names = parts.column("checkpoint").to_pylist()
    require_two(names, model=model, chosen=checkpoints is not None)
    arch = dict(zip(names, architectures(store, parts), strict=True))
    for prev, cur in itertools.pairwise(names):
        if arch[prev][1] != arch[cur][1]:
            raise CompareArgumentError(
                f"checkpoints {prev!r} and {cur!r} have {arch[prev][1]} and {arch[cur][1]} "
                "outputs; they must match: pass checkpoints= (-c/--checkpoint on the command "
                "line) of one architecture."
            )
    t = point_regions(store, model=model, points=points, slice=slice, checkpoints=checkpoints)
    rows = t.select(["checkpoint", "step", "point_id", "pattern", "label"]).to_pylist()
    by_ck: dict[str, dict[int, tuple[bytes, int]]] = {}
    order: list[tuple[str, int]] = []
    for r in rows:
        if r["checkpoint"] not in by_ck:
            by_ck[r["checkpoint"]] = {}
            order.append((r["checkpoint"], r["step"]))
        if r["pattern"] is not None:  # a point outside the domain lies in no region
            by_ck[r["checkpoint"]][r["point_id"]] = (r["pattern"], r["label"])
    out = []
    for (prev, _), (cur, step) in itertools.pairwise(order):
        a, b = by_ck[prev], by_ck[cur]
        common = sorted(set(a) & set(b))
        n = len(common)
        pc: float | None = sum(a[i][0] != b[i][0] for i in common) / n if n else float("nan")
        if arch[prev][0] != arch[cur][0]:
            pc = None  # patterns of different layers: no common meaning
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
    return pa.Table.from_pylist(out, schema=CHURN_SCHEMA)


#: ``churn``'s columns, typed also when no row says (steps all null, no rows).
CHURN_SCHEMA = pa.schema(
    [
        ("checkpoint", pa.string()),
        ("step", pa.int64()),
        ("previous", pa.string()),
        ("pattern_churn", pa.float64()),
        ("label_churn", pa.float64()),
        ("n_points", pa.int64()),
    ]
)
