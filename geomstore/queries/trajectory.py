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
    con = store.reader()
    con.register("_gs_lc", lc)
    try:
        table = con.execute(
            "SELECT checkpoint, step, coalesce(split, 'all') AS split, count(*) AS n_points, "
            "avg(n_neurons) AS lc_mean, quantile_cont(n_neurons, 0.25) AS lc_q25, "
            "quantile_cont(n_neurons, 0.5) AS lc_q50, quantile_cont(n_neurons, 0.75) AS lc_q75, "
            "avg(boundary_density) AS density_mean FROM _gs_lc "
            "GROUP BY ALL ORDER BY split, step NULLS LAST, checkpoint"
        ).to_arrow_table()
        metrics = con.execute(
            "SELECT c.name AS checkpoint, c.metrics FROM checkpoints c "
            "JOIN models m USING (model_id) WHERE m.name = ?",
            [model],
        ).fetchall()
    finally:
        con.unregister("_gs_lc")
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
