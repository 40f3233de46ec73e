"""Merging the pieces of one activation pattern's cell into one region.

A max unit is split by a tournament of pairwise comparisons (candidate ``j`` against the
winner so far). A comparison between two candidates that both lose to a later one still
cuts the cell, so one pattern's cell (convex: the set where a pattern holds is an
intersection of half-planes) can come out in several adjacent pieces with the same
pattern and the same affine map. This module glues them back: pieces with equal pattern
hashes become one convex polygon, whose sides keep the cut ids of the pieces' outer
sides (so the edge overlay still finds every boundary segment and its unit).

Only partitions with max units can have such pieces; the others pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import shapely

__all__ = ["merge_equal_patterns"]


def _pieces(verts: np.ndarray, n: np.ndarray, rows: np.ndarray) -> list[Any]:
    return [shapely.Polygon(verts[r, : n[r]]) for r in rows]


def _union_ring(members: list[Any], tol: float) -> np.ndarray:
    """Vertices (counter-clockwise, no collinear ones) of the union of convex pieces."""
    # the union is convex: the hull of the pieces' corners (no overlay, no robustness issue)
    hull = shapely.convex_hull(shapely.multipoints(shapely.get_coordinates(members)))
    ring = np.asarray(shapely.get_coordinates(hull))[:-1]
    if not shapely.is_ccw(shapely.LinearRing(np.vstack([ring, ring[:1]]))):
        ring = ring[::-1]
    pts = [ring[0]]
    for q in ring[1:]:  # near-duplicate corners (pieces meeting to rounding) count once
        if np.linalg.norm(q - pts[-1]) > tol:
            pts.append(q)
    if len(pts) > 3 and np.linalg.norm(pts[0] - pts[-1]) <= tol:
        pts.pop()
    changed = True
    while changed and len(pts) > 3:  # drop corners on a straight side (T-junctions)
        changed = False
        for i in range(len(pts)):
            a, b, c = pts[i - 1], pts[i], pts[(i + 1) % len(pts)]
            cross = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
            if abs(cross) <= tol * max(float(np.linalg.norm(c - a)), 1e-300):
                pts.pop(i)
                changed = True
                break
    return np.asarray(pts)


def _side_labels(
    ring: np.ndarray,
    verts: np.ndarray,
    n: np.ndarray,
    side: np.ndarray,
    rows: np.ndarray,
    tol: float,
) -> np.ndarray:
    """For each side of the union, the label of the longest piece side lying on it."""
    starts, ends, labels = [], [], []
    for r in rows:
        pv = verts[r, : n[r]]
        starts.append(pv)
        ends.append(np.roll(pv, -1, axis=0))
        labels.append(side[r, : n[r]])
    a, b, lab = np.concatenate(starts), np.concatenate(ends), np.concatenate(labels)
    p, q = ring, np.roll(ring, -1, axis=0)
    d = q - p  # (m, 2)
    norm = np.maximum(np.linalg.norm(d, axis=1), 1e-300)

    def dist(x: np.ndarray) -> np.ndarray:  # (E, m) distance of points x to each side's line
        rel = x[:, None, :] - p[None, :, :]
        return np.abs(d[None, :, 0] * rel[..., 1] - d[None, :, 1] * rel[..., 0]) / norm

    on = (dist(a) <= tol) & (dist(b) <= tol)
    length = np.where(on, np.linalg.norm(b - a, axis=1)[:, None], -1.0)
    best = length.argmax(axis=0)
    return np.where(length.max(axis=0) > 0, lab[best], -(1 << 62)).astype(np.int64)


def merge_equal_patterns(
    raw: dict[str, Any], hashes: np.ndarray, tol: float
) -> tuple[dict[str, Any], np.ndarray]:
    """Glue pieces with equal pattern hashes; returns the new raw arrays and hashes.

    ``raw`` holds ``verts`` (P, V, 2), ``n``, ``side``, ``values``, ``packed`` (or None) in
    centred slice coordinates, as :meth:`geomstore.engine.descent.RawRegions.concat` gives.
    The first piece of each group (in descent order) keeps its place; the others go.
    """
    if len(hashes) < 2:
        return raw, hashes
    _, first, inverse, counts = np.unique(
        hashes, axis=0, return_index=True, return_inverse=True, return_counts=True
    )
    inverse = inverse.reshape(-1)
    if counts.max() == 1:
        return raw, hashes
    verts, n, side = raw["verts"], raw["n"], raw["side"]
    groups = np.flatnonzero(counts > 1)
    members = {g: np.flatnonzero(inverse == g) for g in groups}
    rings: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for g in list(groups):
        rows = members[g]
        pieces = _pieces(verts, n, rows)
        ring = _union_ring(pieces, tol)
        total = float(sum(q.area for q in pieces))
        if abs(shapely.Polygon(ring).area - total) > 1e-9 * max(total, 1e-300) + tol * tol:
            del members[g]  # not one convex cell (should not happen): keep the pieces
            continue
        rings[int(first[g])] = (ring, _side_labels(ring, verts, n, side, rows, tol))
    groups = np.array(sorted(members), dtype=np.int64)
    if not groups.size:
        return raw, hashes
    width = max(verts.shape[1], max(len(r) for r, _ in rings.values()))
    drop = np.zeros(len(n), dtype=bool)
    for g in groups:
        drop[members[g]] = True
        drop[first[g]] = False
    keep = np.flatnonzero(~drop)
    new_v = np.zeros((len(keep), width, 2))
    new_s = np.full((len(keep), width), -(1 << 62), dtype=np.int64)
    new_v[:, : verts.shape[1]] = verts[keep]
    new_s[:, : side.shape[1]] = side[keep]
    new_n = n[keep].copy()
    where = {int(r): i for i, r in enumerate(keep)}
    for r, (ring, labels) in rings.items():
        i = where[r]
        new_v[i] = 0.0
        new_v[i, : len(ring)] = ring
        new_v[i, len(ring) :] = ring[0]
        new_s[i] = -(1 << 62)
        new_s[i, : len(ring)] = labels
        new_n[i] = len(ring)
    out = dict(raw)
    out |= {"verts": new_v, "n": new_n, "side": new_s, "values": raw["values"][keep]}
    if raw.get("packed") is not None:
        out["packed"] = raw["packed"][keep]
    return out, hashes[keep]
