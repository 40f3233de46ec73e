"""Store-level versions of the partition queries: by model, slice and checkpoint names,
across many checkpoints in one call."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from geomstore.queries.agreement import agreement
from geomstore.queries.boundary import NoBoundaryError, sample_boundary
from geomstore.queries.fragmentation import fragmentation
from geomstore.queries.stats import resolve_partitions
from geomstore.store.store import Store

__all__ = ["agreement_over", "boundary_samples", "fragmentation_over"]


def _with_checkpoint(table: pa.Table, name: str, step: int | None) -> pa.Table:
    n = table.num_rows
    table = table.add_column(0, "step", pa.array([step] * n, type=pa.int64()))
    return table.add_column(0, "checkpoint", pa.array([name] * n, type=pa.string()))


def boundary_samples(
    store: Store,
    *,
    model: str,
    n: int,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
    **options: Any,
) -> pa.Table:
    """``sample_boundary`` for every checkpoint (options: seed, pair, near, within, offset).

    Checkpoints without a decision boundary on the slice, or without the part of it that
    ``pair`` / ``near`` ask for, give no rows; :class:`~geomstore.queries.NoBoundaryError`
    is raised only when some checkpoint has a boundary and none has that part.
    """
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    out = []
    missed: NoBoundaryError | None = None
    for p in parts.to_pylist():
        part = store.load_partition(p["partition_id"])
        if part.boundary.num_rows == 0:
            continue
        try:
            samples = sample_boundary(part.boundary, part.slice, n, **options)
        except NoBoundaryError as exc:
            missed = exc  # this checkpoint lacks the pair (or the near part): no rows
            continue
        out.append(_with_checkpoint(samples, p["checkpoint"], p["step"]))
    if not out and missed is not None:
        raise missed
    if not out:
        return _with_checkpoint(
            sample_boundary(
                pa.table(
                    {k: pa.array([], pa.float64()) for k in ("u0_a", "u1_a", "u0_b", "u1_b")}
                    | {k: pa.array([], pa.int64()) for k in ("region_id", "class_a", "class_b")}
                ),
                _slice_of(store, parts),
                0,
            ),
            "",
            None,
        )
    return pa.concat_tables(out)


def _slice_of(store: Store, parts: pa.Table) -> Any:
    return store.load_partition(parts.column("partition_id")[0].as_py()).slice


def fragmentation_over(
    store: Store,
    *,
    model: str,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
) -> pa.Table:
    """``fragmentation`` for every checkpoint: checkpoint, step, class, area, components."""
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    return pa.concat_tables(
        [
            _with_checkpoint(
                fragmentation(store.load_partition(p["partition_id"])), p["checkpoint"], p["step"]
            )
            for p in parts.to_pylist()
        ]
    )


def agreement_over(
    store: Store,
    *,
    model: str,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
    spacing: float | None = None,
) -> pa.Table:
    """``agreement`` between consecutive checkpoints (each row names ``previous``)."""
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    rows = parts.to_pylist()
    out = []
    loaded = {r["partition_id"]: store.load_partition(r["partition_id"]) for r in rows}
    for prev, cur in itertools.pairwise(rows):
        t = agreement(loaded[prev["partition_id"]], loaded[cur["partition_id"]], spacing=spacing)
        t = _with_checkpoint(t, cur["checkpoint"], cur["step"])
        out.append(t.add_column(2, "previous", pa.array([prev["checkpoint"]] * t.num_rows)))
    if not out:
        return pa.table({"checkpoint": pa.array([], pa.string())})
    return pa.concat_tables(out)
