"""Local complexity over training (query 2): per-set means and quantiles per checkpoint,
and the turning points of the descent / ascent / descent curve."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from geomstore.queries.complexity import Layers, LCArgumentError, Shape, local_complexity
from geomstore.store.store import Store

__all__ = ["lc_trajectory", "turning_points"]


def turning_points(values: Sequence[float], *, prominence: float = 0.25) -> dict[str, int | None]:
    """Indices of the end of the first descent, the following peak, and the start of the
    second descent (None where the curve has no such phase).

    A rise or fall counts only when it spans at least ``prominence`` times the curve's
    range (max - min); smaller bumps are noise. The curve is cut into legs at its
    significant turns (a zigzag with that minimum reversal): ``first_descent_end`` is the
    lowest point of the first leg when that leg falls, ``peak`` the highest point of the
    rise after it (or of the first leg, when the curve starts by rising), and
    ``second_descent_start`` is the peak when a significant fall follows it. A curve that
    ends while falling (or rising) has its last point as the end of that leg.

    Parameters
    ----------
    values : sequence of float
        The curve, in order (e.g. the mean local complexity per checkpoint).
    prominence : float
        The smallest rise or fall that counts, as a fraction of the range, in (0, 1].

    Examples
    --------
    >>> turning_points([5, 3, 2, 4, 6, 5, 3])
    {'first_descent_end': 2, 'peak': 4, 'second_descent_start': 4}
    >>> turning_points([5, 3, 3.2, 2, 4, 6, 5.8, 6.1, 3])  # bumps below a quarter of the range
    {'first_descent_end': 3, 'peak': 7, 'second_descent_start': 7}
    """
    if not 0 < prominence <= 1:
        raise LCArgumentError(f"prominence must be in (0, 1]; got {prominence!r}.")
    v = np.asarray(values, dtype=float)
    none: dict[str, int | None] = {
        "first_descent_end": None,
        "peak": None,
        "second_descent_start": None,
    }
    if len(v) < 3 or not np.all(np.isfinite(v)) or v.max() == v.min():
        return none
    legs = _zigzag(v, prominence * float(v.max() - v.min()))
    # legs: (index where the leg ends, +1 rising / -1 falling, confirmed by a reversal)
    k = 0
    end = None
    if legs[0][1] < 0:
        end = legs[0][0]
        k = 1
    if k >= len(legs):
        return none | {"first_descent_end": end}
    peak, _, confirmed = legs[k]
    return {
        "first_descent_end": end,
        "peak": peak,
        "second_descent_start": peak if confirmed else None,
    }


def _zigzag(v: np.ndarray, h: float) -> list[tuple[int, int, bool]]:
    """The legs of ``v`` between reversals of at least ``h`` (``0 < h <= range``): for each,
    the index of its extreme, its direction, and whether a reversal of ``h`` follows."""
    hi = lo = cand = 0
    t = 1
    direction = 0
    while direction == 0:  # the first move of h decides the first leg's direction
        hi = t if v[t] > v[hi] else hi
        lo = t if v[t] < v[lo] else lo
        if v[t] <= v[hi] - h:
            direction, cand = -1, hi + int(np.argmin(v[hi : t + 1]))
        elif v[t] >= v[lo] + h:
            direction, cand = 1, lo + int(np.argmax(v[lo : t + 1]))
        t += 1
    legs = []
    for i in range(t, len(v)):
        if direction * (v[i] - v[cand]) > 0:
            cand = i  # the leg goes on
        elif direction * (v[cand] - v[i]) >= h:
            legs.append((cand, direction, True))  # reversed: the leg ended at cand
            direction, cand = -direction, i
    legs.append((cand, direction, False))
    return legs


def lc_trajectory(
    store: Store,
    *,
    model: str,
    points: np.ndarray | str,
    radius: float,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
    shape: Shape = "disk",
    layers: Layers = "hidden",
) -> tuple[pa.Table, dict[str, dict[str, int | None]]]:
    """Mean and quartiles of local complexity per checkpoint and point set.

    The arguments are those of :func:`~geomstore.queries.local_complexity`; ``layers="all"``
    also counts the output units, as the curves of "Deep networks always grok" do for MLPs.

    Returns the table (checkpoint, step, split, n_points, lc_mean, lc_q25, lc_q50, lc_q75,
    density_mean, metrics) and, per split, the steps of the curve's turning points.
    ``density_mean`` is the mean of ``boundary_density`` (the units' zero sets only, per the
    whole neighbourhood's area). Points whose neighbourhood misses the slice's domain
    (null in :func:`~geomstore.queries.local_complexity`) are left out: ``n_points``
    counts those that are averaged, and a split with none has null statistics.
    """
    lc = local_complexity(
        store,
        model=model,
        points=points,
        radius=radius,
        slice=slice,
        checkpoints=checkpoints,
        shape=shape,
        layers=layers,
    )
    table = _per_checkpoint(lc)
    metrics = (
        store.reader()
        .execute(
            "SELECT c.name AS checkpoint, c.metrics FROM checkpoints c "
            "JOIN models m USING (model_id) WHERE m.name = ?",
            [model],
        )
        .fetchall()
    )
    by_name = dict(metrics)
    table = table.append_column(
        "metrics",
        pa.array([by_name.get(c) for c in table.column("checkpoint").to_pylist()], pa.string()),
    )
    turns: dict[str, dict[str, int | None]] = {}
    rows = table.to_pylist()
    for split in sorted({r["split"] for r in rows}):
        sub = [r for r in rows if r["split"] == split]
        tp = turning_points([r["lc_mean"] for r in sub])
        turns[split] = {k: (sub[i]["step"] if i is not None else None) for k, i in tp.items()}
    return table, turns


def _per_checkpoint(lc: pa.Table) -> pa.Table:
    """Mean and quartiles (linear interpolation, as SQL's quantile_cont) of n_neurons and
    the mean density per (split, checkpoint), ordered by split, step and checkpoint.

    ``lc`` is :func:`local_complexity`'s table: one block of the same points per
    checkpoint, the checkpoints ordered by step (nulls last) and name.
    """
    names = lc.column("checkpoint").to_pylist()
    n_rows = len(names)
    splits = ["all" if x is None else x for x in lc.column("split").to_pylist()]
    ids = np.asarray(lc.column("point_id"))
    n = int(ids.max()) + 1 if n_rows else 0
    k = n_rows // n if n else 0
    lcv = _floats(lc.column("n_neurons")).reshape(k, n)
    dens = _floats(lc.column("boundary_density")).reshape(k, n)
    steps = lc.column("step").to_pylist()[::n] if n else []
    point_split = np.array(splits[:n], dtype=object)
    cols: dict[str, list[object]] = {c: [] for c in _COLUMNS}
    # points seen at every checkpoint (a neighbourhood misses the domain at all or none:
    # the checkpoints share one slice), so each checkpoint averages the same points
    seen = ~np.isnan(lcv).any(axis=0) if k else np.zeros(n, dtype=bool)
    for split in sorted(set(point_split.tolist())):
        sel = (point_split == split) & seen
        cols["checkpoint"] += names[::n]
        cols["step"] += steps
        cols["split"] += [split] * k
        cols["n_points"] += [int(sel.sum())] * k
        if not sel.any():
            for name in ("lc_mean", "lc_q25", "lc_q50", "lc_q75", "density_mean"):
                cols[name] += [None] * k
            continue
        q = np.quantile(lcv[:, sel], [0.25, 0.5, 0.75], axis=1)
        cols["lc_mean"] += lcv[:, sel].mean(axis=1).tolist()
        for j, name in enumerate(("lc_q25", "lc_q50", "lc_q75")):
            cols[name] += q[j].tolist()
        cols["density_mean"] += dens[:, sel].mean(axis=1).tolist()
    return pa.table(
        {c: pa.array(v, type=t) for (c, v), t in zip(cols.items(), _TYPES, strict=True)}
    )


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as float64, nulls as NaN."""
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), np.float64)


_COLUMNS = (
    "checkpoint",
    "step",
    "split",
    "n_points",
    "lc_mean",
    "lc_q25",
    "lc_q50",
    "lc_q75",
    "density_mean",
)
_TYPES = (pa.string(), pa.int64(), pa.string(), pa.int64()) + (pa.float64(),) * 5
