"""The service's endpoints: thin handlers over ``geomstore.queries`` and ``Store.sql``.

Every table endpoint answers JSON by default and Arrow IPC, Parquet, CSV or GeoJSON by
``?format=`` or the ``Accept`` header (see :mod:`geomstore.service.formats`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from geomstore import queries
from geomstore.errors import GeomstoreError, NotFoundError
from geomstore.queries import catalog
from geomstore.queries.stats import resolve_partitions
from geomstore.service.formats import choose_format, encode_table
from geomstore.service.models import (
    CompareRequest,
    JobRequest,
    PointsRequest,
    SampleRequest,
    Selection,
    SQLRequest,
)
from geomstore.service.state import LimitError, ServiceState
from geomstore.service.tables import (
    Table,
    parse_bbox,
    partition_rows,
    require_partition,
    with_affine,
)
from geomstore.store.sqlutil import sql_in
from geomstore.store.store import Store

__all__ = ["router"]

router = APIRouter()
FORMAT = Query(None, description="json (default), arrow, parquet, csv or geojson.")
CHECKPOINT = Query(None, description="Only these checkpoints (repeatable).")
#: ``agreement``'s boundary sampling step when none is given, in slice diameters.
DEFAULT_SPACING = 1e-4


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
        deadline=time.monotonic() + state(request).config.timeout,
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
    parts = catalog.partitions(
        store, model=selection.model, slice=selection.slice, checkpoints=selection.checkpoints
    )
    dataset = getattr(selection, "dataset", None)
    if dataset is not None:
        slice_ids = sorted(set(parts.column("slice_id").to_pylist()))
        if len(slice_ids) == 1:  # the query's slice: the error the query itself gives
            on = catalog.datasets(store, slice=slice_ids[0]).column("dataset").to_pylist()
            if dataset not in on:
                raise catalog.missing_dataset(store, dataset, slice_ids[0])
            return
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
    box = parse_bbox(bbox)
    cols = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    cols = list(dict.fromkeys(cols)) if cols else None  # a column named twice: once
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
        s, "/api/partitions/{id}", lambda st: s.loaded.get(st, partition_id, require_partition)
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
        lambda st: s.loaded.get(st, partition_id, require_partition),
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
        lambda st: with_affine(
            queries.point_regions(
                st,
                model=body.model,
                points=pts,
                slice=body.slice,
                checkpoints=body.checkpoints,
                affine=True,
            )
        ),
        body,
    )
    return answer(request, table, format)


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
    def run(st: Store) -> pa.Table:
        _check_spacing(st, body, s.limits.max_boundary_points)
        return queries.agreement_over(
            st,
            model=body.model,
            slice=body.slice,
            checkpoints=body.checkpoints,
            spacing=body.spacing,
        )

    return answer(request, _run(s, "/api/compare", run, body), format)


def _check_spacing(store: Store, body: CompareRequest, most: int) -> None:
    """Refuse a ``spacing`` that samples more boundary points than ``most`` in all: the
    boundary distances are NumPy work, which the query deadline cannot interrupt."""
    parts = resolve_partitions(
        store, model=body.model, slice=body.slice, checkpoints=body.checkpoints
    )
    if parts.num_rows < 2:
        return
    ids = parts.column("partition_id").to_pylist()
    rows = store.reader().execute(
        "SELECT partition_id, sum(sqrt((u0_b - u0_a) ^ 2 + (u1_b - u1_a) ^ 2)) FROM boundary "
        f"WHERE partition_id IN {sql_in(ids)} GROUP BY ALL"
    )
    length = {pid: float(n or 0.0) for pid, n in rows.fetchall()}
    lengths = [length.get(pid, 0.0) for pid in ids]
    # each consecutive pair samples both boundaries: inner checkpoints count twice
    total = 2 * sum(lengths) - lengths[0] - lengths[-1]
    diameter = store.load_slice(parts.column("slice_id")[0].as_py()).diameter
    step = body.spacing or diameter * DEFAULT_SPACING
    if total / step > most:
        raise LimitError(
            f"spacing: {step:g} samples about {total / step:.3g} boundary points, more than "
            f"this server allows ({most}); give spacing >= {total / most:.3g} (slice units) "
            "or fewer checkpoints."
        )


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


@router.get("/api/jobs", summary="The job queue: status, attempts, error, partition", tags=["jobs"])
def list_jobs(
    request: Request,
    s: State,
    status: Literal["queued", "running", "done", "failed"] | None = None,
    model: str | None = None,
    format: str | None = FORMAT,
) -> Response:
    from geomstore.jobs import job_table

    table = _run(s, "/api/jobs", lambda st: job_table(st, status=status, model=model))
    return answer(request, table, format)


@router.get("/api/jobs/{job_id}", summary="One job (from POST /api/jobs)", tags=["jobs"])
def get_job(s: State, job_id: str) -> dict[str, Any]:
    from geomstore.jobs import job_table

    rows = _run(s, "/api/jobs/{job_id}", lambda st: job_table(st, job_id=job_id)).to_pylist()
    if not rows:
        raise NotFoundError(
            f"no job {job_id!r} in this store; list them with GET /api/jobs.",
            kind="job",
            name=job_id,
        )
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in rows[0].items()}


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
