"""Local complexity over training (query 2): per-set means and quantiles per checkpoint,
and the turning points of the descent / ascent / descent curve."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from geomstore.queries.complexity import Layers, Shape, local_complexity
from geomstore.store.store import Store

__all__ = ["lc_trajectory", "turning_points"]


def turning_points(values: Sequence[float]) -> dict[str, int | None]:
    """Indices of the end of the first descent, the following peak, and the start of the
    second descent (None where the curve has no such phase).

    Examples
    --------
    >>> turning_points([5, 3, 2, 4, 6, 5, 3])
    {'first_descent_end': 2, 'peak': 4, 'second_descent_start': 4}
    """
    v = np.asarray(values, dtype=float)
    if len(v) < 3:
        return {"first_descent_end": None, "peak": None, "second_descent_start": None}
    i = 0
    while i + 1 < len(v) and v[i + 1] <= v[i]:
        i += 1
    end = i if i > 0 else None
    j = i
    while j + 1 < len(v) and v[j + 1] >= v[j]:
        j += 1
    peak = j if j > i else None
    second = j if peak is not None and j + 1 < len(v) and v[j + 1] < v[j] else None
    return {"first_descent_end": end, "peak": peak, "second_descent_start": second}


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
        "metrics", pa.array([by_name.get(c) for c in table.column("checkpoint").to_pylist()])
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
    lcv = np.asarray(lc.column("n_neurons"), dtype=np.float64).reshape(k, n)
    dens = np.asarray(lc.column("boundary_density"), dtype=np.float64).reshape(k, n)
    steps = lc.column("step").to_pylist()[::n] if n else []
    point_split = np.array(splits[:n], dtype=object)
    cols: dict[str, list[object]] = {c: [] for c in _COLUMNS}
    for split in sorted(set(point_split.tolist())):
        sel = point_split == split
        q = np.quantile(lcv[:, sel], [0.25, 0.5, 0.75], axis=1)
        cols["checkpoint"] += names[::n]
        cols["step"] += steps
        cols["split"] += [split] * k
        cols["n_points"] += [int(sel.sum())] * k
        cols["lc_mean"] += lcv[:, sel].mean(axis=1).tolist()
        for j, name in enumerate(("lc_q25", "lc_q50", "lc_q75")):
            cols[name] += q[j].tolist()
        cols["density_mean"] += dens[:, sel].mean(axis=1).tolist()
    return pa.table(
        {c: pa.array(v, type=t) for (c, v), t in zip(cols.items(), _TYPES, strict=True)}
    )


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
