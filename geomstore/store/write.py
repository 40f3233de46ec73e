"""The store's writes: a partition with its catalog rows and geometry, and a data set.

:meth:`Store.add <geomstore.store.store.Store.add>` and :meth:`Store.add_points
<geomstore.store.store.Store.add_points>` are these functions; each write is one
transaction, retried while the catalog is busy (another writer holds it).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from geomstore.errors import AbortedWriteError, CheckpointConflictError, StoreError
from geomstore.store.sqlutil import _hash, _retry, _rollback, _wkt_polygon

if TYPE_CHECKING:
    from geomstore.engine.partition import Partition
    from geomstore.store.store import Store

__all__ = ["write_partition", "write_points"]


def _check_writable(store: Store) -> None:
    if store.read_only:
        raise StoreError("this store is open read-only; open it without read_only to write.")


def _check_arguments(
    partition: Any, model: Any, checkpoint: Any, metrics: dict[str, Any] | None
) -> dict[str, float] | None:
    """Refuse what would store a partition nobody can find or read back, before writing;
    returns the metrics as plain floats (NumPy scalars are numbers too)."""
    from geomstore.engine.partition import Partition

    if not isinstance(partition, Partition):
        raise StoreError(
            f"store.add takes a Partition (from geomstore.partition(net, slice)), not "
            f"{type(partition).__name__}."
        )
    for what, name in (("model", model), ("checkpoint", checkpoint)):
        if not isinstance(name, str) or not name.strip():
            raise StoreError(f"{what}= must be a non-empty name, not {name!r}.")
    for key, value in (metrics or {}).items():
        ok = value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool))
        if not isinstance(key, str) or not ok:
            raise StoreError(
                f"metrics must map names to numbers; {key!r}: {value!r} is not (store text "
                "in the checkpoint's name or a data set instead)."
            )
    if metrics is None:
        return None
    return {k: None if v is None else float(v) for k, v in metrics.items()}  # type: ignore[misc]


def write_partition(
    store: Store,
    partition: Partition,
    *,
    model: str,
    checkpoint: str,
    step: int | None = None,
    source: str | None = None,
    metrics: dict[str, float] | None = None,
    verified: bool | None = None,
    replace: bool = False,
    before_commit: Callable[[duckdb.DuckDBPyConnection, str], bool] | None = None,
) -> str:
    """:meth:`Store.add <geomstore.store.store.Store.add>`: one partition, one transaction."""
    _check_writable(store)
    metrics = _check_arguments(partition, model, checkpoint, metrics)
    summary = partition.model_summary
    # a layer's index is its place in the list: hashed as 0, as the engine wrote it for
    # every layer until 2026-11-27, so that a model keeps its id in the stores written then
    layers = [{**layer, "layer": 0} for layer in summary["layers"]]
    model_id = _hash("model", model, layers, summary["input_shape"], summary["n_outputs"])
    weights = summary.get("weights_sha256", "")
    checkpoint_id = _hash("checkpoint", model_id, checkpoint, weights)
    sl = partition.slice
    slice_id = sl.content_hash[:20]
    # where and with how much memory it ran does not change the partition
    settings = {
        k: v
        for k, v in partition.settings.items()
        if k not in ("device", "memory", "chunk_elements")
    }
    partition_id = _hash("partition", checkpoint_id, slice_id, settings)

    def write() -> str:
        con = store.con
        con.execute("BEGIN TRANSACTION")
        try:
            row = con.execute(
                "SELECT (SELECT count(*) FROM partitions WHERE partition_id = $p), "
                "(SELECT count(*) FROM models WHERE model_id = $m), "
                "(SELECT count(*) FROM checkpoints WHERE checkpoint_id = $c), "
                "(SELECT count(*) FROM slices WHERE slice_id = $s)",
                {"p": partition_id, "m": model_id, "c": checkpoint_id, "s": slice_id},
            ).fetchone()
            assert row is not None
            exists, have = row[0], tuple(bool(x) for x in row[1:])
            _same_name(con, model, checkpoint, model_id, checkpoint_id, weights, replace)
            if exists and not replace:
                if before_commit is None:
                    con.execute("ROLLBACK")
                    return partition_id
                if not before_commit(con, partition_id):
                    raise AbortedWriteError(f"write of partition {partition_id} aborted")
                con.execute("COMMIT")
                return partition_id
            if exists:
                for table in ("partitions", "regions", "edges", "boundary"):
                    con.execute(f"DELETE FROM {table} WHERE partition_id = ?", [partition_id])
            _insert_catalog(
                con,
                have,
                model_id,
                model,
                summary,
                checkpoint_id,
                checkpoint,
                step,
                source,
                weights,
                metrics,
                slice_id,
                sl,
            )
            _insert_geometry(con, partition_id, partition)
            con.execute(
                "INSERT INTO partitions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)",
                [
                    partition_id,
                    checkpoint_id,
                    slice_id,
                    settings["engine_version"],
                    json.dumps(settings, sort_keys=True),
                    partition.n_regions,
                    partition.edges.num_rows,
                    partition.boundary.num_rows,
                    partition.settings["device"],
                    partition.seconds,
                    verified,
                ],
            )
            if before_commit is not None and not before_commit(con, partition_id):
                raise AbortedWriteError(f"write of partition {partition_id} aborted")
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        return partition_id

    try:
        return _retry(write)
    except (duckdb.IOException, duckdb.HTTPException) as exc:
        raise StoreError(
            f"cannot write partition {partition_id} to the data path {store.data_path} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); check that it exists "
            "and that the credentials may write there."
        ) from exc


def _same_name(
    con: duckdb.DuckDBPyConnection,
    model: str,
    checkpoint: str,
    model_id: str,
    checkpoint_id: str,
    weights: str,
    replace: bool,
) -> None:
    """One (model, checkpoint) name, one checkpoint: refuse a second one under a stored
    name (other weights or architecture), or with ``replace`` remove the stored one with
    its partitions first (in the caller's transaction)."""
    old = con.execute(
        "SELECT c.checkpoint_id, c.sha256, c.model_id, "
        "(SELECT count(*) FROM partitions p WHERE p.checkpoint_id = c.checkpoint_id) "
        "FROM checkpoints c JOIN models m ON m.model_id = c.model_id "
        "WHERE m.name = ? AND c.name = ? AND c.checkpoint_id <> ?",
        [model, checkpoint, checkpoint_id],
    ).fetchall()
    if not old:
        return
    n = sum(int(r[3]) for r in old)
    if not replace:
        what = "other weights" if old[0][2] == model_id else "another architecture"
        raise CheckpointConflictError(
            f"checkpoint {checkpoint!r} of model {model!r} is stored already with {what} "
            f"(weights sha256 {str(old[0][1])[:12]}, these {weights[:12]}); pass "
            f"replace=True (CLI: --replace) to replace it and its {n} partition(s), or store "
            "this one under another checkpoint or model name."
        )
    ids = [r[0] for r in old]
    pids = [
        r[0]
        for r in con.execute(
            "SELECT partition_id FROM partitions WHERE list_contains(?, checkpoint_id)", [ids]
        ).fetchall()
    ]
    for table in ("regions", "edges", "boundary", "partitions"):
        con.execute(f"DELETE FROM {table} WHERE list_contains(?, partition_id)", [pids])
    con.execute("DELETE FROM checkpoints WHERE list_contains(?, checkpoint_id)", [ids])
    con.execute(  # a model row left without checkpoints goes too
        "DELETE FROM models WHERE model_id <> ? AND list_contains(?, model_id) AND model_id "
        "NOT IN (SELECT model_id FROM checkpoints)",
        [model_id, list({r[2] for r in old})],
    )


def _insert_catalog(
    con: duckdb.DuckDBPyConnection,
    have: tuple[bool, ...],
    model_id: str,
    model: str,
    summary: dict[str, Any],
    checkpoint_id: str,
    checkpoint: str,
    step: int | None,
    source: str | None,
    weights: str,
    metrics: dict[str, float] | None,
    slice_id: str,
    sl: Any,
) -> None:
    have_model, have_checkpoint, have_slice = have
    if not have_model:
        con.execute(
            "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)",
            [
                model_id,
                model,
                json.dumps(summary, sort_keys=True),
                json.dumps(summary["input_shape"]),
                summary["n_outputs"],
                summary["n_units"],
                json.dumps([layer["units"] for layer in summary["layers"]]),
            ],
        )
    if not have_checkpoint:
        con.execute(
            "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)",
            [
                checkpoint_id,
                model_id,
                checkpoint,
                step,
                source,
                weights,
                json.dumps(metrics or {}, sort_keys=True),
            ],
        )
    if not have_slice:
        con.execute(
            "INSERT INTO slices VALUES (?, ?, ?, ?, ?, ?, ST_GeomFromText(?), now()::TIMESTAMP)",
            [
                slice_id,
                sl.name,
                sl.dim,
                json.dumps(list(sl.input_shape)),
                sl.origin.tolist(),
                sl.basis.reshape(-1).tolist(),
                _wkt_polygon(sl.domain),
            ],
        )


def _insert_geometry(con: duckdb.DuckDBPyConnection, partition_id: str, part: Partition) -> None:
    con.register("_gs_regions", part.regions)
    con.register("_gs_edges", part.edges)
    con.register("_gs_boundary", part.boundary)
    try:
        con.execute(
            "INSERT INTO regions SELECT ?, region_id, ST_GeomFromWKB(geometry), area, "
            "centroid_u0, centroid_u1, n_vertices, pattern::BLOB, A::DOUBLE[], c::DOUBLE[], "
            "label, slope_norm, pattern_hash::BLOB FROM _gs_regions",
            [partition_id],
        )
        con.execute(
            "INSERT INTO edges SELECT ?, edge_id, ST_GeomFromWKB(geometry), u0_a, u1_a, "
            "u0_b, u1_b, length, region_left, region_right, layer, neuron, unit, "
            "border_side FROM _gs_edges",
            [partition_id],
        )
        con.execute(
            "INSERT INTO boundary SELECT ?, ST_GeomFromWKB(geometry), u0_a, u1_a, u0_b, "
            "u1_b, length, region_id, class_a, class_b, level, normal_u0, normal_u1 "
            "FROM _gs_boundary",
            [partition_id],
        )
    finally:
        for name in ("_gs_regions", "_gs_edges", "_gs_boundary"):
            con.unregister(name)


def write_points(
    store: Store,
    name: str,
    slice: Any,
    x: Any,
    *,
    labels: Sequence[int] | Any | None = None,
    split: str = "train",
) -> str:
    """:meth:`Store.add_points <geomstore.store.store.Store.add_points>`: one data set."""
    import numpy as np

    _check_writable(store)
    if not isinstance(name, str) or not name.strip():
        raise StoreError(f"the data set needs a non-empty name, not {name!r}.")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"points must be an array of numbers ({exc}).") from None
    d = int(slice.origin.size)
    if arr.ndim == 0 or arr.size != len(arr) * d or len(arr) == 0:
        raise StoreError(
            f"points must have shape (n, {d}) or (n, *{tuple(slice.input_shape)}) for this "
            f"slice's inputs, with n >= 1; got {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr.reshape(len(arr), -1)).any(1)))
        raise StoreError(f"{bad} of the {len(arr)} points hold NaN or inf; drop or fix them.")
    u, dist = slice.project(arr.reshape(len(arr), -1))
    lab = np.asarray(labels if labels is not None else np.full(len(u), -1), dtype=np.int64)
    if lab.shape != (len(u),):
        raise StoreError(f"labels must have one entry per point ({len(u)}), got {lab.shape}.")
    slice_id = slice.content_hash[:20]
    dataset_id = _hash("dataset", name, slice_id, split)
    table = pa.table(
        {
            "point_id": np.arange(len(u), dtype=np.int64),
            "u0": u[:, 0],
            "u1": u[:, 1],
            "distance": dist,
            "label": lab,
        }
    )

    def write() -> str:
        con = store.con
        con.execute("BEGIN TRANSACTION")
        try:
            for t in ("datasets", "points"):
                con.execute(f"DELETE FROM {t} WHERE dataset_id = ?", [dataset_id])
            con.execute(
                "INSERT INTO datasets VALUES (?, ?, ?, ?, now()::TIMESTAMP)",
                [dataset_id, name, slice_id, len(u)],
            )
            con.register("_gs_points", table)
            con.execute(
                "INSERT INTO points SELECT ?, point_id, u0, u1, ST_Point(u0, u1), distance, "
                "label, ? FROM _gs_points",
                [dataset_id, split],
            )
            con.unregister("_gs_points")
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        return dataset_id

    return _retry(write)
