"""Fragmentation (query 9): connected components of each class's area on a slice.

Inside a region the network is affine, so each class's cell in a region is convex (one
piece, or empty). Nodes are (region, class) pairs whose cell has positive area; two nodes
of the same class are joined when the stretch of their shared edge where that class wins
has positive length (the output is continuous, so both sides agree on it).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import shapely
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from geomstore.engine.partition import Partition
from geomstore.engine.tables import _clip_keep_positive, polygon_measures

__all__ = ["class_cell_areas", "fragmentation"]


def _winning_interval(
    amap: np.ndarray, cvec: np.ndarray, a: np.ndarray, b: np.ndarray, cls: int
) -> tuple[np.ndarray, np.ndarray]:
    """Parameter interval of segments [a, b] where class ``cls`` has the largest output."""
    fa = np.einsum("skd,sd->sk", amap, a) + cvec
    fb = np.einsum("skd,sd->sk", amap, b) + cvec
    lo, hi = np.zeros(len(a)), np.ones(len(a))
    for j in range(amap.shape[1]):
        if j == cls:
            continue
        ga = fa[:, cls] - fa[:, j]  # g(t) = ga + t (gb - ga) >= 0
        gb = fb[:, cls] - fb[:, j]
        slope = gb - ga
        with np.errstate(divide="ignore", invalid="ignore"):
            root = -ga / slope
        lo = np.where(slope > 0, np.maximum(lo, root), lo)
        hi = np.where(slope < 0, np.minimum(hi, root), hi)
        lo = np.where((slope == 0) & (ga < 0), 2.0, lo)
    return lo, hi


def class_cell_areas(part: Partition) -> np.ndarray:
    """Area of each class's cell in each region, (regions, K), by half-plane clipping."""
    return class_cells(part)[1]


def class_cells(part: Partition) -> tuple[list[np.ndarray], np.ndarray]:
    """Each class's cell in each region: per class a (regions,) array of shapely polygons
    (empty where the class never wins), and the areas (regions, K)."""
    amap, cvec = part.affine_maps()
    p, k = cvec.shape
    polys = part.polygons()
    counts = shapely.get_num_coordinates(polys) - 1
    width = int(counts.max())
    verts = np.zeros((p, width, 2))
    for i, poly in enumerate(polys):  # small; a vectorised ragged fill would also do
        xy = np.asarray(poly.exterior.coords)[:-1]
        verts[i, : len(xy)] = xy
        verts[i, len(xy) :] = xy[0]  # the clip reads padding as repeats of vertex 0
    areas = np.zeros((p, k))
    cells: list[np.ndarray] = []
    for cls in range(k):
        tv, tn = torch.as_tensor(verts), torch.as_tensor(counts.astype(np.int64))
        ts = torch.full(tv.shape[:2], -1, dtype=torch.long)
        alive = torch.ones(p, dtype=torch.bool)
        for j in range(k):
            if j == cls:
                continue
            coef = np.concatenate(
                [amap[:, cls] - amap[:, j], (cvec[:, cls] - cvec[:, j])[:, None]], 1
            )
            tv, tn, ts, keep = _clip_keep_positive(
                tv, tn, ts, torch.as_tensor(coef), torch.full((p,), j), 0.0
            )
            alive &= keep
        vv, nn = tv.numpy(), tn.numpy()
        ar, _ = polygon_measures(vv, nn)
        live = alive.numpy() & (ar > 0)
        areas[:, cls] = np.where(live, ar, 0.0)
        # only live cells become polygons: a clipped-away cell may keep fewer than 3 vertices
        keep_n = np.where(live, nn, 0)
        ring = np.arange(vv.shape[1])[None, :] < keep_n[:, None]
        coords = vv[ring]
        rows = np.flatnonzero(live)
        offsets = np.concatenate([[0], np.cumsum(keep_n[rows])])
        polys = np.full(p, shapely.Polygon(), dtype=object)
        if rows.size:
            polys[rows] = shapely.from_ragged_array(
                shapely.GeometryType.POLYGON, coords, (offsets, np.arange(rows.size + 1))
            )
        cells.append(polys)
    if k == 1:
        areas[:, 0] = np.asarray(part.regions.column("area"))
        cells = [part.polygons()]
    return cells, areas


def fragmentation(part: Partition, *, min_length: float = 1e-12) -> pa.Table:
    """Connected components of each class's area (K >= 2 outputs).

    Returns one row per class: class, area, components.

    Examples
    --------
    >>> import torch, geomstore
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> part = geomstore.partition(net, geomstore.Slice.box((-1, -1), (1, 1)), device="cpu")
    >>> fragmentation(part).column_names
    ['class', 'area', 'components']
    """
    amap, cvec = part.affine_maps()
    k = cvec.shape[1]
    areas = class_cell_areas(part)
    node_ok = areas > 0
    p = areas.shape[0]
    e = part.edges.to_pydict()
    left = np.array(e["region_left"], dtype=np.int64)
    right = np.array([-1 if r is None else r for r in e["region_right"]], dtype=np.int64)
    inner = right >= 0
    a = np.stack([e["u0_a"], e["u1_a"]], 1)[inner]
    b = np.stack([e["u0_b"], e["u1_b"]], 1)[inner]
    left, right = left[inner], right[inner]
    seg_len = np.linalg.norm(b - a, axis=1)
    rows = []
    for cls in range(k):
        lo, hi = _winning_interval(amap[left], cvec[left], a, b, cls)
        join = ((hi - lo) * seg_len > min_length) & node_ok[left, cls] & node_ok[right, cls]
        g = coo_matrix((np.ones(int(join.sum())), (left[join], right[join])), shape=(p, p))
        _, comp = connected_components(g, directed=False)
        present = np.nonzero(node_ok[:, cls])[0]
        rows.append(
            {
                "class": cls,
                "area": float(areas[:, cls].sum()),
                "components": len(np.unique(comp[present])),
            }
        )
    return pa.Table.from_pylist(rows)
