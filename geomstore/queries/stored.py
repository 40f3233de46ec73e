"""Store-level versions of the partition queries: by model, slice and checkpoint names,
across many checkpoints in one call."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from geomstore.errors import GeomstoreError
from geomstore.queries.agreement import agreement, require_two
from geomstore.queries.boundary import NoBoundaryError, class_pairs, no_match, sample_boundary
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
    is raised only when some checkpoint has a boundary and none has that part. With
    ``n=0``, or no boundary at all, the table has no rows and the usual columns.
    """
    if n < 0:
        raise GeomstoreError(f"n must be >= 0 (-n on the command line); got {n}.")
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    out = []
    missed = False
    pairs: set[tuple[int, int]] = set()
    for p in parts.to_pylist():
        part = store.load_partition(p["partition_id"])
        if part.boundary.num_rows == 0:
            continue
        pairs |= class_pairs(part.boundary)
        try:
            samples = sample_boundary(part.boundary, part.slice, n, **options)
        except NoBoundaryError:
            missed = True  # this checkpoint lacks the pair (or the near part): no rows
            continue
        out.append(_with_checkpoint(samples, p["checkpoint"], p["step"]))
    if not out and missed:
        near = options.get("near") is not None
        raise no_match(options.get("pair"), options.get("within") if near else None, pairs)
    if not out:  # no boundary at all, or n=0: no rows, the usual columns
        empty = sample_boundary(_NO_BOUNDARY, _slice_of(store, parts), 0)
        return _with_checkpoint(empty, "", None)
    return pa.concat_tables(out)


_NO_BOUNDARY = pa.table(
    {k: pa.array([], pa.float64()) for k in ("u0_a", "u1_a", "u0_b", "u1_b")}
    | {k: pa.array([], pa.int64()) for k in ("region_id", "class_a", "class_b")}
)


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
    """``agreement`` between consecutive checkpoints (each row names ``previous``).

    Columns: checkpoint, step, previous, then :func:`agreement`'s (typed: a checkpoint
    without a decision boundary has null distances). Fewer than two checkpoints raise
    :class:`~geomstore.queries.CompareArgumentError`.
    """
    parts = resolve_partitions(store, model=model, slice=slice, checkpoints=checkpoints)
    rows = parts.to_pylist()
    require_two([r["checkpoint"] for r in rows], model=model, chosen=checkpoints is not None)
    out = []
    loaded = {r["partition_id"]: store.load_partition(r["partition_id"]) for r in rows}
    for prev, cur in itertools.pairwise(rows):
        t = agreement(loaded[prev["partition_id"]], loaded[cur["partition_id"]], spacing=spacing)
        t = _with_checkpoint(t, cur["checkpoint"], cur["step"])
        previous = pa.array([prev["checkpoint"]] * t.num_rows, type=pa.string())
        out.append(t.add_column(2, "previous", previous))
    return pa.concat_tables(out)
