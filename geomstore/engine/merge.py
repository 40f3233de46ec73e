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
import torch

from geomstore.engine.host import to_host
from geomstore.engine.split import PAD_SIDE, pad_polys

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
    return np.where(length.max(axis=0) > 0, lab[best], PAD_SIDE).astype(np.int64)


def merge_equal_patterns(raw: dict[str, Any], tol: float) -> dict[str, Any]:
    """Glue pieces with equal pattern hashes; returns the new raw fields.

    ``raw`` holds tensors ``verts`` (P, V, 2), ``n``, ``side``, ``values``, ``hashes``
    (P, 2) in centred slice coordinates on the compute device, and ``packed`` (a list of
    host arrays, or None), as :meth:`geomstore.engine.descent.RawRegions.concat` gives.
    The first piece of each group (in descent order) keeps its place; the others go.
    Equal hashes are found where the tensors are; only the groups' pieces go to the host
    for their union, and a partition without such pieces comes back as it is.
    """
    hashes = raw["hashes"]
    if len(hashes) < 2:
        return raw
    dev = hashes.device
    order = torch.argsort(hashes[:, 1], stable=True)
    order = order[torch.argsort(hashes[order, 0], stable=True)]
    srt = hashes[order]
    same = (srt[1:] == srt[:-1]).all(1)  # row i of the sorted hashes equals row i + 1
    if not bool(same.any()):
        return raw
    grouped = torch.zeros(len(hashes), dtype=torch.bool, device=dev)
    grouped[:-1] |= same
    grouped[1:] |= same
    rows = torch.sort(order[grouped]).values  # every piece of every group, descent order
    rows_h = to_host(rows)
    verts, n, side = (to_host(raw[k].index_select(0, rows)) for k in ("verts", "n", "side"))
    drop, rings = _plan(verts, n, side, to_host(hashes.index_select(0, rows)), tol)
    keep = torch.ones(len(hashes), dtype=torch.bool, device=dev)
    keep[torch.as_tensor(rows_h[drop], device=dev)] = False
    kept = torch.nonzero(keep).squeeze(1)
    width = max(int(raw["verts"].shape[1]), max((len(r) for r, _ in rings.values()), default=0))
    # fresh tensors (indexed), new slots repeating vertex 0; the unions go in their place
    new_v, new_s = pad_polys(raw["verts"][kept], raw["side"][kept], width)
    new_n = raw["n"][kept]
    if rings:
        ring_v = np.zeros((len(rings), width, 2))
        ring_s = np.full((len(rings), width), PAD_SIDE, dtype=np.int64)
        ring_n = np.zeros(len(rings), dtype=np.int64)
        for i, (ring, labels) in enumerate(rings.values()):
            ring_v[i, : len(ring)] = ring
            ring_v[i, len(ring) :] = ring[0]
            ring_s[i, : len(ring)] = labels
            ring_n[i] = len(ring)
        at = torch.as_tensor(rows_h[list(rings)], device=dev)  # the first piece of each
        idx = (torch.cumsum(keep, 0) - 1)[at]  # its row among the kept
        new_v[idx] = torch.as_tensor(ring_v, dtype=new_v.dtype, device=dev)
        new_s[idx] = torch.as_tensor(ring_s, device=dev)
        new_n[idx] = torch.as_tensor(ring_n, dtype=new_n.dtype, device=dev)
    out = dict(raw)
    out |= {
        "verts": new_v,
        "n": new_n,
        "side": new_s,
        "values": raw["values"][kept],
        "hashes": hashes[kept],
    }
    if raw.get("packed") is not None:
        out["packed"] = _drop_rows(raw["packed"], np.sort(rows_h[drop]))
    return out


def _drop_rows(chunks: list[np.ndarray], gone: np.ndarray) -> list[np.ndarray]:
    """The host chunks without the rows ``gone`` (sorted indices into their concatenation);
    chunks that lose no row are kept as they are, not copied."""
    out = []
    lo = 0
    for chunk in chunks:
        hi = lo + len(chunk)
        local = gone[np.searchsorted(gone, lo) : np.searchsorted(gone, hi)] - lo
        out.append(np.delete(chunk, local, axis=0) if len(local) else chunk)
        lo = hi
    return out


def _plan(
    verts: np.ndarray, n: np.ndarray, side: np.ndarray, hashes: np.ndarray, tol: float
) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """For pieces that all belong to groups of equal hashes: which pieces go (a mask),
    and, for the first piece of each group, the union's ring and side labels."""
    _, first, inverse, counts = np.unique(
        hashes, axis=0, return_index=True, return_inverse=True, return_counts=True
    )
    inverse = inverse.reshape(-1)
    drop = np.zeros(len(n), dtype=bool)
    rings: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for g in np.flatnonzero(counts > 1):
        rows = np.flatnonzero(inverse == g)
        pieces = _pieces(verts, n, rows)
        ring = _union_ring(pieces, tol)
        total = float(sum(q.area for q in pieces))
        if abs(shapely.Polygon(ring).area - total) > 1e-9 * max(total, 1e-300) + tol * tol:
            continue  # not one convex cell (should not happen): keep the pieces
        rings[int(first[g])] = (ring, _side_labels(ring, verts, n, side, rows, tol))
        drop[rows] = True
        drop[first[g]] = False
    return drop, rings
