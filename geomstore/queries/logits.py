"""The zero sets of the output units (the logits) inside every region, as segments: what
``local_complexity(..., layers="all")`` counts on top of the stored edges, which hold the
hidden units' zero sets only."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from geomstore.errors import GeomstoreError
from geomstore.store.sqlutil import sql_in

__all__ = ["PIDX", "logit_segments"]

PIDX = "list_position($ids, e.partition_id)::INTEGER - 1 AS pidx"  # index into the ids


def logit_segments(con: duckdb.DuckDBPyConnection, ids: list[str], offset: int, k: int) -> pa.Table:
    """The zero set of every output unit inside every region, as segments.

    Inside a convex region the zero set of logit j is the line A[j] u + c[j] = 0 clipped to
    the polygon: the segment between the extreme points where the line meets the region's
    boundary, which the stored edges tile (each edge names the regions on its two sides).
    The network is continuous, so a crossing found on an edge with the map of the region
    on its left is also the crossing for the region on its right. A logit that is
    identically zero on a region has no line there and is skipped.
    """
    n_parts = len(ids)
    ids_in = sql_in(ids)
    reg = con.execute(
        f"SELECT {PIDX.replace('e.', 'r.')}, r.region_id, r.A, r.c FROM regions r "
        f"WHERE r.partition_id IN {ids_in}",
        {"ids": ids},
    ).to_arrow_table()
    edg = con.execute(
        f"SELECT {PIDX}, e.region_left AS rl, coalesce(e.region_right, -1) AS rr, "
        "e.u0_a, e.u1_a, e.u0_b, e.u1_b FROM edges e "
        f"WHERE e.partition_id IN {ids_in} AND e.region_left IS NOT NULL",
        {"ids": ids},
    ).to_arrow_table()
    cols = {"pidx": np.int32, "unit": np.int32, "u0_a": float, "u1_a": float}
    cols |= {"u0_b": float, "u1_b": float}
    out: dict[str, list[np.ndarray]] = {c: [np.zeros(0, t)] for c, t in cols.items()}
    if reg.num_rows and edg.num_rows and k:

        def col(t: pa.Table, name: str) -> np.ndarray:
            return np.asarray(t.column(name).to_numpy())

        rid = col(reg, "region_id").astype(np.int64)
        rspan = int(rid.max()) + 1
        rpid = col(reg, "pidx").astype(np.int64)
        row_of = np.full(n_parts * rspan, -1, dtype=np.int64)  # (partition, region) -> row
        row_of[rpid * rspan + rid] = np.arange(len(rid))
        amap = reg.column("A").combine_chunks().flatten().to_numpy().reshape(-1, k, 2)
        cvec = reg.column("c").combine_chunks().flatten().to_numpy().reshape(-1, k)
        epid = col(edg, "pidx").astype(np.int64)
        rl, rr = col(edg, "rl").astype(np.int64), col(edg, "rr").astype(np.int64)
        if rl.max(initial=-1) >= rspan or rr.max(initial=-1) >= rspan:
            raise GeomstoreError(
                "an edge names a region its partition does not hold: the store is "
                "inconsistent; recompute that partition."
            )
        left = row_of[epid * rspan + rl]
        right = np.where(rr >= 0, row_of[epid * rspan + np.maximum(rr, 0)], -1)
        if (left < 0).any() or ((rr >= 0) & (right < 0)).any():
            raise GeomstoreError(
                "an edge names a region its partition does not hold: the store is "
                "inconsistent; recompute that partition."
            )
        ends = [col(edg, c) for c in ("u0_a", "u1_a", "u0_b", "u1_b")]
        for j in range(k):
            segs = _line_in_regions(amap[:, j], cvec[:, j], left, right, *ends)
            if segs is None:
                continue
            grp, a0, a1, b0, b1 = segs
            out["pidx"].append(rpid[grp].astype(np.int32))
            out["unit"].append(np.full(len(grp), offset + j, dtype=np.int32))
            for name, v in zip(("u0_a", "u1_a", "u0_b", "u1_b"), (a0, a1, b0, b1), strict=True):
                out[name].append(v)
    return pa.table({c: pa.array(np.concatenate(v)) for c, v in out.items()})


def _line_in_regions(
    slope: np.ndarray,
    const: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    ax: np.ndarray,
    ay: np.ndarray,
    bx: np.ndarray,
    by: np.ndarray,
) -> tuple[np.ndarray, ...] | None:
    """Each region's piece of the line slope[r] . u + const[r] = 0 (r, a0, a1, b0, b1)."""
    s0, s1, c = slope[left, 0], slope[left, 1], const[left]
    fa = s0 * ax + s1 * ay + c
    fb = s0 * bx + s1 * by + c
    cross = (np.minimum(fa, fb) <= 0) & (np.maximum(fa, fb) >= 0) & (fa != fb)
    on = (fa == 0) & (fb == 0) & ((s0 != 0) | (s1 != 0))  # the edge lies on the line
    t = fa[cross] / (fa[cross] - fb[cross])
    px = np.concatenate([ax[cross] + t * (bx[cross] - ax[cross]), ax[on], bx[on]])
    py = np.concatenate([ay[cross] + t * (by[cross] - ay[cross]), ay[on], by[on]])
    idx = np.concatenate([np.flatnonzero(cross), np.flatnonzero(on), np.flatnonzero(on)])
    # each point lies on the boundary of the regions on both sides of its edge
    two = right[idx] >= 0
    row = np.concatenate([left[idx], right[idx][two]])
    px, py = np.concatenate([px, px[two]]), np.concatenate([py, py[two]])
    if len(row) == 0:
        return None
    g0, g1 = slope[row, 0], slope[row, 1]
    pos = px * -g1 + py * g0  # position along the line's direction (-g1, g0)
    order = np.lexsort((pos, row))
    row, pos = row[order], pos[order]
    first = np.ones(len(row), dtype=bool)
    first[1:] = row[1:] != row[:-1]
    start = np.flatnonzero(first)
    end = np.append(start[1:], len(row)) - 1
    keep = pos[end] > pos[start]
    start, end, grp = start[keep], end[keep], row[start[keep]]
    a0, a1, cc = slope[grp, 0], slope[grp, 1], const[grp]
    n2 = a0 * a0 + a1 * a1
    base0, base1 = -cc * a0 / n2, -cc * a1 / n2  # the line's point nearest the origin
    d0, d1 = -a1 / n2, a0 / n2
    lo, hi = pos[start], pos[end]
    return grp, base0 + lo * d0, base1 + lo * d1, base0 + hi * d0, base1 + hi * d1
