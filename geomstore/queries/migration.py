"""Region-migration index (query 3): the share of neuron-edge length lying within distance
d of the decision boundary, per checkpoint (Humayun et al., "Deep networks always grok")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from geomstore.errors import GeomstoreError
from geomstore.queries.stats import resolve_partitions
from geomstore.store.sqlutil import sql_in
from geomstore.store.store import Store

__all__ = ["migration_index", "near_intervals"]


def _seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points p (m, 2) to segments [a, b] (m, 2)."""
    d = b - a
    dd = (d * d).sum(1)
    t = np.clip(((p - a) * d).sum(1) / np.where(dd > 0, dd, 1.0), 0, 1)
    return np.linalg.norm(p - (a + t[:, None] * d), axis=1)


def near_intervals(
    ea: np.ndarray, eb: np.ndarray, sa: np.ndarray, sb: np.ndarray, d: float, iters: int = 60
) -> tuple[np.ndarray, np.ndarray]:
    """Parameter interval [t0, t1] of edge [ea, eb] within distance d of segment [sa, sb].

    The distance from ea + t (eb - ea) to a segment is convex in t, so its sublevel set is
    one interval: a ternary search finds the minimum, bisections find both crossings.
    Empty intervals come back with t0 > t1.
    """

    def f(t: np.ndarray) -> np.ndarray:
        return _seg_dist(ea + t[:, None] * (eb - ea), sa, sb)

    lo, hi = np.zeros(len(ea)), np.ones(len(ea))
    for _ in range(iters):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        left = f(m1) < f(m2)
        hi = np.where(left, m2, hi)
        lo = np.where(left, lo, m1)
    tm = 0.5 * (lo + hi)
    inside = f(tm) <= d
    # left crossing in [0, tm], right crossing in [tm, 1]
    a0, a1 = np.zeros(len(ea)), tm.copy()
    b0, b1 = tm.copy(), np.ones(len(ea))
    for _ in range(iters):
        ma = 0.5 * (a0 + a1)
        ina = f(ma) <= d
        a1 = np.where(ina, ma, a1)
        a0 = np.where(ina, a0, ma)
        mb = 0.5 * (b0 + b1)
        inb = f(mb) <= d
        b0 = np.where(inb, mb, b0)
        b1 = np.where(inb, b1, mb)
    t0 = np.where(f(np.zeros(len(ea))) <= d, 0.0, a1)
    t1 = np.where(f(np.ones(len(ea))) <= d, 1.0, b0)
    return np.where(inside, t0, 1.0), np.where(inside, t1, 0.0)


def migration_index(
    store: Store,
    *,
    model: str,
    distance: float,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
) -> pa.Table:
    """Per checkpoint: neuron-edge length within ``distance`` of the decision boundary, the
    total neuron-edge length, and their ratio ``share`` (null without a boundary)."""
    if not distance > 0:
        raise GeomstoreError(f"distance must be > 0; got {distance!r}.")
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    ids = parts.column("partition_id").to_pylist()
    ids_in = sql_in(ids)
    con = store.reader()
    pairs = con.execute(
        "SELECT list_position($ids, e.partition_id) - 1 AS pidx, e.edge_id, e.u0_a, e.u1_a, "
        "e.u0_b, e.u1_b, e.length, b.u0_a AS s0a, b.u1_a AS s1a, b.u0_b AS s0b, b.u1_b AS s1b "
        "FROM edges e JOIN boundary b ON b.partition_id = e.partition_id "
        "AND ST_DWithin(e.geometry, b.geometry, $d) "
        f"WHERE e.region_right IS NOT NULL AND e.partition_id IN {ids_in}",
        {"ids": ids, "d": float(distance)},
    ).to_arrow_table()
    totals = dict(
        con.execute(
            "SELECT list_position($ids, partition_id) - 1, sum(length) FROM edges "
            f"WHERE region_right IS NOT NULL AND partition_id IN {ids_in} GROUP BY 1",
            {"ids": ids},
        ).fetchall()
    )
    has_boundary = {
        i
        for (i,) in con.execute(
            "SELECT DISTINCT list_position($ids, partition_id) - 1 FROM boundary "
            f"WHERE partition_id IN {ids_in}",
            {"ids": ids},
        ).fetchall()
    }
    near = _near_length(pairs, len(ids), distance)
    rows = []
    for i, p in enumerate(parts.to_pylist()):
        total = float(totals.get(i, 0.0))
        rows.append(
            {
                "checkpoint": p["checkpoint"],
                "step": p["step"],
                "near_length": float(near[i]),
                "edge_length": total,
                "share": (float(near[i]) / total) if i in has_boundary and total else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=_SCHEMA)


#: typed, so that ``share`` (null without a boundary) and ``step`` keep their types
_SCHEMA = pa.schema(
    [
        ("checkpoint", pa.string()),
        ("step", pa.int64()),
        ("near_length", pa.float64()),
        ("edge_length", pa.float64()),
        ("share", pa.float64()),
    ]
)


def _near_length(pairs: pa.Table, k: int, d: float) -> np.ndarray:
    if pairs.num_rows == 0:
        return np.zeros(k)
    c = {n: pairs.column(n).to_numpy() for n in pairs.column_names}
    ea, eb = np.stack([c["u0_a"], c["u1_a"]], 1), np.stack([c["u0_b"], c["u1_b"]], 1)
    sa, sb = np.stack([c["s0a"], c["s1a"]], 1), np.stack([c["s0b"], c["s1b"]], 1)
    t0, t1 = near_intervals(ea, eb, sa, sb, d)
    ok = t1 > t0
    pidx, edge, t0, t1 = c["pidx"][ok], c["edge_id"][ok], t0[ok], t1[ok]
    length = c["length"][ok]
    # union of intervals per (partition, edge): sort by start, sweep
    order = np.lexsort((t0, edge, pidx))
    pidx, edge, t0, t1, length = pidx[order], edge[order], t0[order], t1[order], length[order]
    out = np.zeros(k)
    group = np.ones(len(t0), dtype=bool)
    group[1:] = (pidx[1:] != pidx[:-1]) | (edge[1:] != edge[:-1])
    start = np.nonzero(group)[0]
    for gi, s in enumerate(start):
        e = start[gi + 1] if gi + 1 < len(start) else len(t0)
        cov, cur0, cur1 = 0.0, t0[s], t1[s]
        for j in range(s + 1, e):
            if t0[j] <= cur1:
                cur1 = max(cur1, t1[j])
            else:
                cov += cur1 - cur0
                cur0, cur1 = t0[j], t1[j]
        cov += cur1 - cur0
        out[pidx[s]] += cov * length[s]
    return out
