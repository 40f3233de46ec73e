"""Points sampled on the decision boundary, uniformly by length (SplineCam section 5)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from geomstore._aliases import renamed_kwargs
from geomstore.errors import GeomstoreError
from geomstore.slice import Slice

__all__ = ["sample_boundary"]


@renamed_kwargs(slice_="slice")
def sample_boundary(
    boundary: pa.Table,
    slice: Slice,
    n: int,
    *,
    seed: int = 0,
    pair: tuple[int, int] | None = None,
    near: np.ndarray | None = None,
    within: float | None = None,
    offset: float = 0.0,
) -> pa.Table:
    """Sample ``n`` points uniformly by length on decision-boundary segments.

    Parameters
    ----------
    boundary : pyarrow.Table
        A partition's boundary table (``Partition.boundary``, or rows from the store).
    slice : Slice
        The partition's slice (``slice_=`` is a deprecated spelling).
    n : int
        How many points.
    pair : (int, int), optional
        Only the boundary between these two classes.
    near, within : optional
        Only the parts of the boundary within distance ``within`` of the points ``near``
        (n, 2) in slice coordinates.
    offset : float
        Push each sample by ``offset`` along the unit normal, which points towards
        ``class_b`` (``offset > 0`` lands where class_b wins, ``< 0`` class_a).

    Returns
    -------
    pyarrow.Table: u0, u1, x (input coordinates, a fixed-shape tensor column shaped like one
    model input: ``table["x"].combine_chunks().to_numpy_ndarray()`` is (n, *input_shape)),
    region_id, class_a, class_b, normal_u0, normal_u1.

    Examples
    --------
    >>> import torch, geomstore
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(),
    ...                           torch.nn.Linear(16, 3))
    >>> part = geomstore.partition(net, geomstore.Slice.box((-1, -1), (1, 1)), device="cpu")
    >>> sample_boundary(part.boundary, part.slice, 5, seed=1).num_rows
    5
    """
    if n < 0:
        raise GeomstoreError(f"n must be >= 0; got {n}.")
    names = ["u0_a", "u1_a", "u0_b", "u1_b", "region_id", "class_a", "class_b"]
    if "normal_u0" in boundary.column_names:
        names += ["normal_u0", "normal_u1"]
    cols = {k: boundary.column(k).to_numpy(zero_copy_only=False) for k in names}
    # a canonical segment order: the same seed gives the same samples whatever the row order
    keys = ("u1_b", "u0_b", "u1_a", "u0_a", "class_b", "class_a", "region_id")
    order = np.lexsort([cols[k] for k in keys])
    cols = {k: v[order] for k, v in cols.items()}
    a = np.stack([cols["u0_a"], cols["u1_a"]], 1).astype(float)
    b = np.stack([cols["u0_b"], cols["u1_b"]], 1).astype(float)
    ca, cb = cols["class_a"].astype(np.int64), cols["class_b"].astype(np.int64)
    keep = np.ones(len(a), dtype=bool)
    if pair is not None:
        lo, hi = sorted(pair)
        keep &= (ca == lo) & (cb == hi)
    t_lo = np.zeros(len(a))
    t_hi = np.ones(len(a))
    if near is not None:
        if within is None or not within > 0:
            raise GeomstoreError("near= needs within= (a distance > 0).")
        t_lo, t_hi = _near_interval(a, b, np.asarray(near, dtype=float).reshape(-1, 2), within)
    seg_len = np.linalg.norm(b - a, axis=1) * np.clip(t_hi - t_lo, 0, None) * keep
    total = seg_len.sum()
    if n and total <= 0:
        raise GeomstoreError(
            "no decision boundary matches the request; widen within= or drop pair=."
        )
    rng = np.random.default_rng(seed)
    if n:
        idx = rng.choice(len(a), size=n, p=seg_len / total)
        t = t_lo[idx] + rng.random(n) * (t_hi[idx] - t_lo[idx])
    else:
        idx, t = np.zeros(0, np.int64), np.zeros(0)
    u = a[idx] + t[:, None] * (b[idx] - a[idx])
    d = b[idx] - a[idx]
    if "normal_u0" in cols:
        normal = np.stack([cols["normal_u0"], cols["normal_u1"]], 1)[idx]
    else:
        normal = np.stack([-d[:, 1], d[:, 0]], 1) / np.linalg.norm(d, axis=1, keepdims=True)
    u = u + offset * normal
    x = slice.lift(u)
    return pa.table(
        {
            "u0": u[:, 0],
            "u1": u[:, 1],
            "x": pa.FixedShapeTensorArray.from_numpy_ndarray(
                np.ascontiguousarray(x.reshape(len(x), *slice.input_shape))
            ),
            "region_id": cols["region_id"][idx].astype(np.int64),
            "class_a": ca[idx],
            "class_b": cb[idx],
            "normal_u0": normal[:, 0],
            "normal_u1": normal[:, 1],
        }
    )


def _near_interval(
    a: np.ndarray, b: np.ndarray, pts: np.ndarray, r: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per segment, the hull of its parameter intervals inside any of the disks."""
    lo = np.full(len(a), np.inf)
    hi = np.full(len(a), -np.inf)
    d = b - a
    qa = (d * d).sum(1)
    for p in pts:
        f = a - p
        qb = 2 * (f * d).sum(1)
        qc = (f * f).sum(1) - r * r
        disc = qb * qb - 4 * qa * qc
        ok = disc > 0
        sq = np.sqrt(np.where(ok, disc, 0))
        t0 = np.clip((-qb - sq) / (2 * qa), 0, 1)
        t1 = np.clip((-qb + sq) / (2 * qa), 0, 1)
        ok &= t1 > t0
        lo = np.where(ok, np.minimum(lo, t0), lo)
        hi = np.where(ok, np.maximum(hi, t1), hi)
    empty = ~np.isfinite(lo)
    return np.where(empty, 0, lo), np.where(empty, 0, hi)
