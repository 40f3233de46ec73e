"""Agreement between two partitions of one slice (query 7): the area where both predict
the same class, per class and in total, and how far the decision boundary moved."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import shapely

from geomstore.engine.partition import Partition
from geomstore.errors import GeomstoreError
from geomstore.queries.fragmentation import class_cells

__all__ = ["CompareArgumentError", "agreement", "require_two"]


class CompareArgumentError(GeomstoreError, ValueError):
    """A comparison was asked of fewer than two checkpoints, or of partitions that differ."""


def require_two(names: list[str], *, model: str, chosen: bool) -> None:
    """Refuse to compare fewer than two checkpoints (``names``, those chosen or stored)."""
    if len(names) >= 2:
        return
    got = f"{len(names)} ({', '.join(names)})" if names else "none"
    if chosen:
        why = f"got {got}: name two or more with checkpoints= (-c/--checkpoint on the "
        why += "command line), or leave it out to compare them all."
    else:
        why = f"model {model!r} has {got} on this slice: store another checkpoint first."
    raise CompareArgumentError(f"compare needs at least two checkpoints; {why}")


def _densify(boundary: pa.Table, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Points every ``spacing`` (or closer) along segments, and each point's weight (length)."""
    c = {k: boundary.column(k).to_numpy() for k in ("u0_a", "u1_a", "u0_b", "u1_b")}
    a = np.stack([c["u0_a"], c["u1_a"]], 1)
    b = np.stack([c["u0_b"], c["u1_b"]], 1)
    length = np.linalg.norm(b - a, axis=1)
    steps = np.maximum(1, np.ceil(length / spacing).astype(np.int64))
    seg = np.repeat(np.arange(len(a)), steps)
    k = np.arange(int(steps.sum())) - np.repeat(np.cumsum(steps) - steps, steps)
    t = (k + 0.5) / steps[seg]
    return a[seg] + t[:, None] * (b - a)[seg], (length / steps)[seg]


def _distances(points: np.ndarray, boundary: pa.Table) -> np.ndarray:
    c = {k: boundary.column(k).to_numpy() for k in ("u0_a", "u1_a", "u0_b", "u1_b")}
    segs = shapely.linestrings(
        np.stack([np.stack([c["u0_a"], c["u1_a"]], 1), np.stack([c["u0_b"], c["u1_b"]], 1)], 1)
    )
    tree = shapely.STRtree(segs)
    idx = tree.query_nearest(shapely.points(points), all_matches=False, return_distance=True)
    out = np.full(len(points), np.inf)
    out[idx[0][0]] = idx[1]
    return out


def agreement(a: Partition, b: Partition, *, spacing: float | None = None) -> pa.Table:
    """Where two partitions of the same slice predict the same class, and boundary movement.

    Returns one row per class (class, area_a, area_b, agree_area) and a final row with
    class null holding the totals, ``agree_share`` (agreeing area / domain area), and the
    boundary movement: ``hausdorff`` and ``mean_distance`` (symmetric mean of the distance
    from each boundary to the other, by length; null where either partition has no
    decision boundary). Every column is typed (``SCHEMA``).

    The agreeing areas are exact (overlay of convex class cells). Boundary distances are
    measured exactly from points spaced at most ``spacing`` apart along each boundary
    (default diameter * 1e-4), so ``hausdorff`` is low by at most ``spacing / 2``.
    """
    if a.slice.content_hash != b.slice.content_hash:
        raise CompareArgumentError("the partitions are on different slices; compare one slice.")
    ka, kb = a.model_summary["n_outputs"], b.model_summary["n_outputs"]
    if ka != kb:
        raise CompareArgumentError(f"the models have {ka} and {kb} outputs; they must match.")
    cells_a, areas_a = class_cells(a)
    cells_b, areas_b = class_cells(b)
    rows = []
    total = 0.0
    for cls in range(ka):
        pa_, pb_ = cells_a[cls], cells_b[cls]
        keep_a = np.nonzero(areas_a[:, cls] > 0)[0]
        keep_b = np.nonzero(areas_b[:, cls] > 0)[0]
        agree = 0.0
        if len(keep_a) and len(keep_b):
            tree = shapely.STRtree(pb_[keep_b])
            ia, ib = tree.query(pa_[keep_a], predicate="intersects")
            agree = float(
                shapely.area(shapely.intersection(pa_[keep_a][ia], pb_[keep_b][ib])).sum()
            )
        total += agree
        rows.append(
            {
                "class": cls,
                "area_a": float(areas_a[:, cls].sum()),
                "area_b": float(areas_b[:, cls].sum()),
                "agree_area": agree,
                "agree_share": None,
                "hausdorff": None,
                "mean_distance": None,
            }
        )
    hausdorff = mean = None
    if a.boundary.num_rows and b.boundary.num_rows:
        step = spacing or a.slice.diameter * 1e-4
        pa_pts, wa = _densify(a.boundary, step)
        pb_pts, wb = _densify(b.boundary, step)
        da, db = _distances(pa_pts, b.boundary), _distances(pb_pts, a.boundary)
        hausdorff = float(max(da.max(), db.max()))
        mean = float(0.5 * ((da * wa).sum() / wa.sum() + (db * wb).sum() / wb.sum()))
    rows.append(
        {
            "class": None,
            "area_a": a.slice.area,
            "area_b": b.slice.area,
            "agree_area": total,
            "agree_share": total / a.slice.area,
            "hausdorff": hausdorff,
            "mean_distance": mean,
        }
    )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


#: ``agreement``'s columns: typed, so that tables of checkpoints with and without a
#: decision boundary (null distances) concatenate.
SCHEMA = pa.schema(
    [
        ("class", pa.int64()),
        ("area_a", pa.float64()),
        ("area_b", pa.float64()),
        ("agree_area", pa.float64()),
        ("agree_share", pa.float64()),
        ("hausdorff", pa.float64()),
        ("mean_distance", pa.float64()),
    ]
)
