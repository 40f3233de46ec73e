"""The service's endpoints: thin handlers over ``geomstore.queries`` and ``Store.sql``.

Every table endpoint answers JSON by default and Arrow IPC, Parquet, CSV or GeoJSON by
``?format=`` or the ``Accept`` header (see :mod:`geomstore.service.formats`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from geomstore import queries
from geomstore.errors import GeomstoreError, NotFoundError
from geomstore.queries import catalog
from geomstore.service.formats import choose_format, encode_table
from geomstore.service.models import (
    CompareRequest,
    JobRequest,
    PointsRequest,
    SampleRequest,
    Selection,
    SQLRequest,
)
from geomstore.service.state import ServiceState
from geomstore.store.store import Store

__all__ = ["router"]

router = APIRouter()
Table = Literal["regions", "edges", "boundary"]
FORMAT = Query(None, description="json (default), arrow, parquet, csv or geojson.")
CHECKPOINT = Query(None, description="Only these checkpoints (repeatable).")


def state(request: Request) -> ServiceState:
    """The running service's state (the app holds one)."""
    st: ServiceState = request.app.state.geomstore
    return st


State = Annotated[ServiceState, Depends(state)]


def answer(
    request: Request,
    table: pa.Table,
    fmt: str | None,
    *,
    truncated: bool = False,
    extra: dict[str, Any] | None = None,
) -> Response:
    """A table in the format the request asked for."""
    body, media = encode_table(
        table,
        choose_format(fmt, request.headers.get("accept")),
        truncated=truncated,
        extra=extra,
    )
    headers = {"X-Geomstore-Truncated": "true" if truncated else "false"}
    return Response(body, media_type=media, headers=headers)


def _run(
    s: ServiceState,
    endpoint: str,
    fn: Callable[[Store], Any],
    selection: Selection | None = None,
) -> Any:
    """``fn(store)`` on a pooled store; a failure on an unknown model, slice or checkpoint
    of ``selection`` becomes :class:`NotFoundError` (the service answers 404)."""
    with s.reading(endpoint) as store:
        try:
            return fn(store)
        except GeomstoreError as exc:
            if selection is None or isinstance(exc, NotFoundError):
                raise
            _require_known(store, selection)
            raise


def _require_known(store: Store, selection: Selection) -> None:
    """Raise :class:`NotFoundError` for an unknown model, slice, checkpoint or data set."""
    catalog.partitions(
        store, model=selection.model, slice=selection.slice, checkpoints=selection.checkpoints
    )
    dataset = getattr(selection, "dataset", None)
    if dataset is not None:
        names = catalog.datasets(store).column("dataset").to_pylist()
        if dataset not in names:
            raise NotFoundError(
                f"no data set {dataset!r} in this store; data sets: {names or 'none yet'}.",
                kind="dataset",
                name=dataset,
            )


# catalog -----------------------------------------------------------------------------------
@router.get("/api/models", summary="Models in the store", tags=["catalog"])
def list_models(request: Request, s: State, format: str | None = FORMAT) -> Response:
    return answer(request, _run(s, "/api/models", catalog.models), format)


@router.get("/api/checkpoints", summary="Checkpoints, of one model or all", tags=["catalog"])
def list_checkpoints(
    request: Request, s: State, model: str | None = None, format: str | None = FORMAT
) -> Response:
    table = _run(s, "/api/checkpoints", lambda st: catalog.checkpoints(st, model=model))
    return answer(request, table, format)


@router.get("/api/slices", summary="Slices (planes and domains)", tags=["catalog"])
def list_slices(request: Request, s: State, format: str | None = FORMAT) -> Response:
    return answer(request, _run(s, "/api/slices", catalog.slices), format)


@router.get("/api/datasets", summary="Data sets projected onto slices", tags=["catalog"])
def list_datasets(
    request: Request, s: State, slice: str | None = None, format: str | None = FORMAT
) -> Response:
    table = _run(s, "/api/datasets", lambda st: catalog.datasets(st, slice=slice))
    return answer(request, table, format)


@router.get(
    "/api/datasets/{dataset}/points", summary="A data set's points on a slice", tags=["catalog"]
)
def dataset_points(
    request: Request, s: State, dataset: str, slice: str, format: str | None = FORMAT
) -> Response:
    u, labels = _run(
        s,
        "/api/datasets/{dataset}/points",
        lambda st: catalog.dataset_points(st, dataset=dataset, slice=slice),
    )
    cols: dict[str, Any] = {"u0": u[:, 0], "u1": u[:, 1]}
    cols["label"] = pa.array(labels if labels is not None else [None] * len(u), pa.int64())
    return answer(request, pa.table(cols), format)


@router.get("/api/partitions", summary="Stored partitions, filtered", tags=["catalog"])
def list_partitions(
    request: Request,
    s: State,
    model: str | None = None,
    slice: str | None = None,
    checkpoint: list[str] | None = CHECKPOINT,
    format: str | None = FORMAT,
) -> Response:
    table = _run(
        s,
        "/api/partitions",
        lambda st: catalog.partitions(st, model=model, slice=slice, checkpoints=checkpoint),
    )
    return answer(request, table, format)


# one partition -----------------------------------------------------------------------------
_COLUMNS: dict[tuple[str, str], list[str]] = {}
_COLUMNS_LOCK = threading.Lock()


def _columns_of(store: Store, table: str) -> list[str]:
    """A data table's columns (but partition_id), per store."""
    key = (store.target, table)
    with _COLUMNS_LOCK:
        if key not in _COLUMNS:
            names = store.sql(f"SELECT * FROM {table} LIMIT 0").table.column_names
            _COLUMNS[key] = [c for c in names if c != "partition_id"]
        return _COLUMNS[key]


def _require_partition(store: Store, partition_id: str) -> None:
    found = store.sql(
        "SELECT count(*) AS n FROM partitions WHERE partition_id = ?", [partition_id]
    ).table
    if found.column("n")[0].as_py() == 0:
        raise NotFoundError(
            f"no partition {partition_id!r} in this store; list them with GET /api/partitions.",
            kind="partition",
            name=partition_id,
        )


def _parse_bbox(bbox: str | None) -> list[float] | None:
    if bbox is None:
        return None
    try:
        vals = [float(v) for v in bbox.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(np.isfinite(vals)) or vals[0] > vals[2] or vals[1] > vals[3]:
        raise GeomstoreError(
            f"bbox {bbox!r}: give four finite numbers u0_min,u1_min,u0_max,u1_max "
            "(min before max), e.g. bbox=-1,-1,1,1"
        )
    return vals


def pattern_hashes(patterns: Sequence[bytes | None]) -> pa.Array:
    """A short hash of each packed activation pattern (the first 16 bytes of its SHA-256),
    for stores written before regions carried the engine's ``pattern_hash``.

    Examples
    --------
    >>> pattern_hashes([b"\\x01", None]).to_pylist()[0].hex()
    '4bf5122f344554c53bde2ebb8cd2b7e3'
    """
    return pa.array(
        [None if p is None else hashlib.sha256(p).digest()[:16] for p in patterns], pa.binary()
    )


def partition_rows(
    store: Store,
    partition_id: str,
    table: Table,
    *,
    columns: Sequence[str] | None,
    bbox: Sequence[float] | None,
    max_rows: int,
) -> tuple[pa.Table, bool]:
    """Rows of one partition's table (geometry as WKB), optionally within a bbox."""
    known = _columns_of(store, table)
    derived = table == "regions" and "pattern_hash" not in known  # an older store
    wanted = list(columns) if columns else list(known) + (["pattern_hash"] if derived else [])
    bad = [c for c in wanted if c not in known and not (derived and c == "pattern_hash")]
    if bad:
        extra = ", pattern_hash" if derived else ""
        raise GeomstoreError(
            f"unknown column {bad[0]!r} of {table}; columns: {', '.join(known)}{extra}."
        )
    select = [c for c in wanted if c != "pattern_hash"]
    if "pattern_hash" in wanted and "pattern" not in select:
        select.append("pattern")
    exprs = ["ST_AsWKB(geometry)::BLOB AS geometry" if c == "geometry" else c for c in select]
    order = known[0] if table != "boundary" else "region_id, u0_a, u1_a"
    sql = f"SELECT {', '.join(exprs) or 'NULL AS none'} FROM {table} WHERE partition_id = ?"
    params: list[Any] = [partition_id]
    if bbox is not None:
        sql += " AND ST_Intersects(geometry, ST_MakeEnvelope(?, ?, ?, ?))"
        params += list(bbox)
    _require_partition(store, partition_id)
    res = store.sql(sql + f" ORDER BY {order}", params, max_rows=max_rows)
    out = res.table
    if "pattern_hash" in wanted:
        out = out.append_column("pattern_hash", pattern_hashes(out.column("pattern").to_pylist()))
    return out.select(wanted), res.truncated


@router.get(
    "/api/partitions/{partition_id}/{table}",
    summary="One partition's regions, edges or decision boundary",
    tags=["partition"],
)
def partition_table(
    request: Request,
    s: State,
    partition_id: str,
    table: Table,
    bbox: str | None = Query(None, description="u0_min,u1_min,u0_max,u1_max"),
    columns: str | None = Query(None, description="Comma-separated columns; default: all."),
    format: str | None = FORMAT,
) -> Response:
    box = _parse_bbox(bbox)
    cols = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    rows, truncated = _run(
        s,
        "/api/partitions/{id}/{table}",
        lambda st: partition_rows(
            st,
            partition_id,
            table,
            columns=cols,
            bbox=box,
            max_rows=s.limits.max_partition_rows,
        ),
    )
    return answer(request, rows, format, truncated=truncated)


@router.get(
    "/api/partitions/{partition_id}",
    summary="A stored partition's slice, model summary and settings",
    tags=["partition"],
)
def partition_meta(s: State, partition_id: str) -> dict[str, Any]:
    part = _run(
        s, "/api/partitions/{id}", lambda st: s.loaded.get(st, partition_id, _require_partition)
    )
    return {
        "partition_id": partition_id,
        "slice": part.slice.to_dict(),
        "model_summary": part.model_summary,
        "settings": part.settings,
        "seconds": part.seconds,
        "n_regions": part.n_regions,
        "n_edges": part.edges.num_rows,
        "n_boundary": part.boundary.num_rows,
    }


@router.get(
    "/api/partitions/{partition_id}/load/{table}",
    summary="A partition's table exactly as store.load_partition rebuilds it (Arrow)",
    tags=["partition"],
)
def partition_load(
    request: Request,
    s: State,
    partition_id: str,
    table: Literal["regions", "edges", "boundary", "states"],
    format: str | None = FORMAT,
) -> Response:
    part = _run(
        s,
        "/api/partitions/{id}/load",
        lambda st: s.loaded.get(st, partition_id, _require_partition),
    )
    if table == "states":
        flat = pa.array(np.ascontiguousarray(part.states).reshape(-1), pa.uint8())
        width = part.states.shape[1]
        out = pa.table({"states": pa.FixedSizeListArray.from_arrays(flat, width)})
    else:
        out = getattr(part, table)
    return answer(request, out, format or "arrow")


# SQL ----------------------------------------------------------------------------------------
@router.post("/api/sql", summary="One read-only SELECT in the SQL sandbox", tags=["query"])
def run_sql(request: Request, s: State, body: SQLRequest, format: str | None = FORMAT) -> Response:
    cap = s.limits.max_rows if body.max_rows is None else min(body.max_rows, s.limits.max_rows)
    timeout = s.config.timeout if body.timeout is None else min(body.timeout, s.config.timeout)
    with s.reading("/api/sql", timeout) as store:
        res = store.sql(body.sql, body.params, max_rows=cap, timeout=timeout)
    return answer(request, res.table, format, truncated=res.truncated)


@router.get(
    "/api/sql", summary="One read-only SELECT (as POST, in the query string)", tags=["query"]
)
def run_sql_get(
    request: Request,
    s: State,
    sql: str = Query(..., description="One SELECT statement."),
    max_rows: int | None = Query(None, ge=0),
    timeout: float | None = Query(None, gt=0),
    format: str | None = FORMAT,
) -> Response:
    body = SQLRequest(sql=sql, params=None, max_rows=max_rows, timeout=timeout)
    return run_sql(request, s, body, format)


# per-point queries --------------------------------------------------------------------------
def _points(s: ServiceState, body: PointsRequest | CompareRequest) -> np.ndarray | str:
    if (body.points is None) == (body.dataset is None):
        raise GeomstoreError("give exactly one of points=[[u0, u1], ...] or dataset=NAME.")
    if body.dataset is not None:
        return body.dataset
    assert body.points is not None
    s.limits.check("points", len(body.points), s.limits.max_points, "--max-points")
    if not body.points:
        raise GeomstoreError("points is empty; give at least one [u0, u1].")
    return np.asarray(body.points, dtype=np.float64)


def _radius(body: PointsRequest) -> float:
    if body.radius is None:
        raise GeomstoreError("local complexity needs radius= (a distance > 0, slice units).")
    return body.radius


@router.post("/api/lc", summary="Local complexity at points, per checkpoint", tags=["query"])
def lc(request: Request, s: State, body: PointsRequest, format: str | None = FORMAT) -> Response:
    pts, radius = _points(s, body), _radius(body)
    table = _run(
        s,
        "/api/lc",
        lambda st: queries.local_complexity(
            st,
            model=body.model,
            points=pts,
            radius=radius,
            slice=body.slice,
            checkpoints=body.checkpoints,
            shape=body.shape,
            layers=body.layers,
        ),
        body,
    )
    return answer(request, table, format)


@router.post("/api/lc/trajectory", summary="LC over training, with turning points", tags=["query"])
def lc_trajectory(
    request: Request, s: State, body: PointsRequest, format: str | None = FORMAT
) -> Response:
    pts, radius = _points(s, body), _radius(body)
    table, turns = _run(
        s,
        "/api/lc/trajectory",
        lambda st: queries.lc_trajectory(
            st,
            model=body.model,
            points=pts,
            radius=radius,
            slice=body.slice,
            checkpoints=body.checkpoints,
            shape=body.shape,
            layers=body.layers,
        ),
        body,
    )
    return answer(request, table, format, extra={"turning_points": turns})


@router.post(
    "/api/points/regions",
    summary="The region holding each point: pattern, affine map, label, distances",
    tags=["query"],
)
def region_at(
    request: Request, s: State, body: PointsRequest, format: str | None = FORMAT
) -> Response:
    pts = _points(s, body)
    table = _run(
        s,
        "/api/points/regions",
        lambda st: _with_affine(
            st,
            queries.point_regions(
                st,
                model=body.model,
                points=pts,
                slice=body.slice,
                checkpoints=body.checkpoints,
            ),
            body,
        ),
        body,
    )
    return answer(request, table, format)


def _with_affine(store: Store, table: pa.Table, body: PointsRequest) -> pa.Table:
    """Add each holding region's partition id, affine map (A, c) and pattern hash (one
    query: ``point_regions`` has checked the model, slice and checkpoints already)."""
    checkpoints = sorted(set(table.column("checkpoint").to_pylist()))
    rids = sorted(set(table.column("region_id").to_pylist()))
    stored = "pattern_hash" in _columns_of(store, "regions")
    sql = (
        "WITH ps AS (SELECT p.partition_id, c.name AS checkpoint FROM partitions p "
        "JOIN checkpoints c USING (checkpoint_id) JOIN models m ON m.model_id = c.model_id "
        "JOIN slices s ON s.slice_id = p.slice_id WHERE m.name = $model "
        "AND list_contains($checkpoints, c.name)"
        + (" AND (s.name = $slice OR s.slice_id = $slice)" if body.slice is not None else "")
        + ") SELECT ps.checkpoint, ps.partition_id, r.region_id, r.A, r.c"
        + (", r.pattern_hash" if stored else "")
        + " FROM regions r JOIN ps USING (partition_id) WHERE list_contains($rids, r.region_id)"
    )
    params: dict[str, Any] = {"model": body.model, "checkpoints": checkpoints, "rids": rids}
    if body.slice is not None:
        params["slice"] = body.slice
    maps = store.sql(sql, params, max_rows=len(checkpoints) * len(rids) + 1).table.to_pylist()
    by_key = {(m["checkpoint"], m["region_id"]): m for m in maps}
    found = [
        by_key.get((c, r), {})
        for c, r in zip(
            table.column("checkpoint").to_pylist(), table.column("region_id").to_pylist()
        )
    ]
    out = table.add_column(
        0, "partition_id", pa.array([f.get("partition_id") for f in found], pa.string())
    )
    out = out.append_column("A", pa.array([f.get("A") for f in found], pa.list_(pa.float64())))
    out = out.append_column("c", pa.array([f.get("c") for f in found], pa.list_(pa.float64())))
    if "pattern_hash" in out.column_names:  # the query gave it already
        return out
    if stored:
        hashes = pa.array([f.get("pattern_hash") for f in found], pa.binary())
    else:
        hashes = pattern_hashes(out.column("pattern").to_pylist())
    return out.append_column("pattern_hash", hashes)


# partition-level queries --------------------------------------------------------------------
@router.get("/api/stats", summary="Partition statistics per checkpoint", tags=["query"])
def stats(
    request: Request,
    s: State,
    model: str,
    slice: str | None = None,
    checkpoint: list[str] | None = CHECKPOINT,
    format: str | None = FORMAT,
) -> Response:
    table = _run(
        s,
        "/api/stats",
        lambda st: queries.partition_stats(st, model=model, slice=slice, checkpoints=checkpoint),
        Selection(model=model, slice=slice, checkpoints=checkpoint),
    )
    return answer(request, table, format)


@router.post(
    "/api/boundary/samples",
    summary="Decision-boundary samples with input-space coordinates x",
    tags=["query"],
)
def boundary_samples(
    request: Request, s: State, body: SampleRequest, format: str | None = FORMAT
) -> Response:
    s.limits.check("n (samples per checkpoint)", body.n, s.limits.max_samples, "--max-samples")
    opts: dict[str, Any] = {"seed": body.seed, "offset": body.offset}
    if body.pair is not None:
        opts["pair"] = tuple(body.pair)
    if body.near is not None:
        s.limits.check("near (points)", len(body.near), s.limits.max_points, "--max-points")
        opts["near"] = np.asarray(body.near, dtype=np.float64).reshape(-1, 2)
        opts["within"] = body.within
    table = _run(
        s,
        "/api/boundary/samples",
        lambda st: queries.boundary_samples(
            st,
            model=body.model,
            n=body.n,
            slice=body.slice,
            checkpoints=body.checkpoints,
            **opts,
        ),
        body,
    )
    return answer(request, table, format)


@router.post(
    "/api/compare",
    summary="Consecutive checkpoints: agreeing area and boundary movement",
    tags=["query"],
)
def compare(
    request: Request, s: State, body: CompareRequest, format: str | None = FORMAT
) -> Response:
    table = _run(
        s,
        "/api/compare",
        lambda st: queries.agreement_over(
            st,
            model=body.model,
            slice=body.slice,
            checkpoints=body.checkpoints,
            spacing=body.spacing,
        ),
        body,
    )
    return answer(request, table, format)


@router.post(
    "/api/compare/churn",
    summary="Consecutive checkpoints: pattern and label churn of points",
    tags=["query"],
)
def churn(
    request: Request, s: State, body: CompareRequest, format: str | None = FORMAT
) -> Response:
    pts = _points(s, body)
    table = _run(
        s,
        "/api/compare/churn",
        lambda st: queries.churn(
            st, model=body.model, points=pts, slice=body.slice, checkpoints=body.checkpoints
        ),
        body,
    )
    return answer(request, table, format)


# jobs ---------------------------------------------------------------------------------------
def _upload_dir(s: ServiceState) -> Path:
    target = Path(s.config.store)
    if target.suffix == ".duckdb" or not target.is_dir():
        raise GeomstoreError(
            "jobs are submitted over HTTP to directory stores only (workers share the "
            "directory); serve a directory store to accept jobs."
        )
    return target / "uploads"


@router.post(
    "/api/jobs", summary="Queue a checkpoint file for the workers (read-write token)", tags=["jobs"]
)
def submit_job(s: State, body: JobRequest) -> dict[str, Any]:
    from geomstore.jobs import submit
    from geomstore.loading import ModelSpec
    from geomstore.slice import Slice

    s.limits.check(
        "the checkpoint file (bytes)", len(body.file) * 3 // 4, s.limits.max_upload, "--max-upload"
    )
    suffix = Path(body.filename).suffix.lower()
    if suffix not in (".pt2", ".pt", ".pth"):
        raise GeomstoreError(
            f"filename {body.filename!r}: send a torch.export program (.pt2) or a TorchScript "
            "file (.pt); weights with a factory are submitted from the server's own machine."
        )
    try:
        data = base64.b64decode(body.file, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GeomstoreError("file is not valid base64; encode the file's bytes.") from exc
    sl = Slice.from_dict(body.slice)
    folder = _upload_dir(s)
    folder.mkdir(exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
    if not path.exists():
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    with s.writing() as store:
        job_id = submit(
            store,
            ModelSpec(str(path)),
            sl,
            model=body.model,
            checkpoint=body.checkpoint,
            step=body.step,
            metrics=body.metrics,
            verify=body.verify,
            options=body.options,
        )
    return {"job_id": job_id}
