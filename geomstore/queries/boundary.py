"""Points sampled on the decision boundary, uniformly by length (SplineCam section 5)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from geomstore._aliases import renamed_kwargs
from geomstore.errors import GeomstoreError
from geomstore.slice import Slice

__all__ = ["NoBoundaryError", "class_pairs", "no_match", "sample_boundary"]


class NoBoundaryError(GeomstoreError, ValueError):
    """No part of the decision boundary matches the requested class pair or ``near=``."""


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

    With ``near=``, the samples are uniform by length over the union of the boundary's
    pieces within ``within`` of some given point; nothing farther is sampled.

    Raises
    ------
    NoBoundaryError
        ``n > 0`` and no boundary length matches ``pair`` / ``near``.

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
        raise GeomstoreError(f"n must be >= 0 (-n on the command line); got {n}.")
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
    if near is not None:
        if within is None or not within > 0:
            raise GeomstoreError("near= needs within= (a distance > 0).")
        pts = np.asarray(near, dtype=float).reshape(-1, 2)
        seg, t_lo, t_hi = _near_intervals(a, b, pts, float(within), keep)
    else:
        seg = np.flatnonzero(keep)
        t_lo, t_hi = np.zeros(len(seg)), np.ones(len(seg))
    # one piece per (segment, interval): uniform by length over the union of the pieces
    piece_len = np.linalg.norm(b[seg] - a[seg], axis=1) * np.clip(t_hi - t_lo, 0, None)
    total = piece_len.sum()
    if n and total <= 0:
        raise no_match(pair, within if near is not None else None, class_pairs(boundary))
    rng = np.random.default_rng(seed)
    if n:
        pick = rng.choice(len(seg), size=n, p=piece_len / total)
        idx = seg[pick]
        t = t_lo[pick] + rng.random(n) * (t_hi[pick] - t_lo[pick])
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
            "x": _tensors(x, tuple(int(d) for d in slice.input_shape)),
            "region_id": cols["region_id"][idx].astype(np.int64),
            "class_a": ca[idx],
            "class_b": cb[idx],
            "normal_u0": normal[:, 0],
            "normal_u1": normal[:, 1],
        }
    )


def class_pairs(boundary: pa.Table) -> set[tuple[int, int]]:
    """The (class_a, class_b) pairs that meet on a boundary table."""
    ca, cb = boundary.column("class_a").to_pylist(), boundary.column("class_b").to_pylist()
    return set(zip(ca, cb, strict=True))


def no_match(
    pair: tuple[int, int] | None, within: float | None, pairs: set[tuple[int, int]]
) -> NoBoundaryError:
    """The error for samples asked of a boundary that lacks the ``pair`` / ``near`` part."""
    what = [f"between classes {min(pair)} and {max(pair)}"] if pair is not None else []
    what += [f"within {within:g} of the near= points"] if within is not None else []
    if not (pairs and what):
        return NoBoundaryError(
            "no decision boundary matches the request: there is none on this slice "
            "(one class wins everywhere)."
        )
    fix = ["choose another pair= (--classes on the command line) or drop it"] * (pair is not None)
    fix += ["widen within="] * (within is not None)
    listed = ", ".join(f"{a},{b}" for a, b in sorted(pairs))
    return NoBoundaryError(
        f"no decision boundary matches the request (none {' '.join(what)}); "
        f"{', or '.join(fix)}; class pairs on the boundary: {listed}."
    )


def _tensors(x: np.ndarray, shape: tuple[int, ...]) -> pa.ExtensionArray:
    """Rows of ``x`` as a fixed-shape tensor column of ``shape``, also when there are none
    (pyarrow's ``from_numpy_ndarray`` refuses an empty array)."""
    if len(x):
        return pa.FixedShapeTensorArray.from_numpy_ndarray(
            np.ascontiguousarray(x.reshape(len(x), *shape))
        )
    value = pa.from_numpy_dtype(x.dtype)
    storage = pa.array([], pa.list_(value, int(np.prod(shape, dtype=np.int64))))
    # the identity permutation, as from_numpy_ndarray gives a C-contiguous array
    kind = pa.fixed_shape_tensor(value, shape, permutation=list(range(len(shape))))
    return pa.ExtensionArray.from_storage(kind, storage)


def _near_intervals(
    a: np.ndarray, b: np.ndarray, pts: np.ndarray, r: float, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parts of the kept segments [a, b] within ``r`` of any of the points ``pts``.

    Returns ``(segment, t_lo, t_hi)``: the union of each segment's parameter intervals
    inside the disks, as disjoint intervals sorted by segment and start (``a + t (b - a)``).
    """
    d = b - a
    qa = (d * d).sum(1)
    cand = np.flatnonzero(keep & (qa > 0))
    segs, los, his = [np.zeros(0, np.int64)], [np.zeros(0)], [np.zeros(0)]
    for p in pts:
        f = a[cand] - p
        qb = 2 * (f * d[cand]).sum(1)
        qc = (f * f).sum(1) - r * r
        disc = qb * qb - 4 * qa[cand] * qc
        ok = disc > 0
        sq = np.sqrt(np.where(ok, disc, 0))
        t0 = np.clip((-qb - sq) / (2 * qa[cand]), 0, 1)
        t1 = np.clip((-qb + sq) / (2 * qa[cand]), 0, 1)
        ok &= t1 > t0
        segs.append(cand[ok])
        los.append(t0[ok])
        his.append(t1[ok])
    seg, lo, hi = np.concatenate(segs), np.concatenate(los), np.concatenate(his)
    if len(seg) == 0:
        return seg, lo, hi
    order = np.lexsort((lo, seg))
    seg, lo, hi = seg[order], lo[order], hi[order]
    # the running maximum of the ends within each segment, exactly: the ends by rank, so
    # that seg * span + rank orders by segment, then end, in int64
    ends, rank = np.unique(hi, return_inverse=True)
    span = len(ends) + 1
    top = np.maximum.accumulate(seg * span + rank.reshape(-1))
    reach = ends[top - seg * span]
    start = np.ones(len(seg), dtype=bool)
    start[1:] = (seg[1:] != seg[:-1]) | (lo[1:] > reach[:-1])
    first = np.flatnonzero(start)
    last = np.append(first[1:], len(seg)) - 1
    return seg[first], lo[first], reach[last]
