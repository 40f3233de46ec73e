"""Computing partitions of checkpoint files: here, as Ray tasks, or through the store's queue.

:func:`compute` partitions every checkpoint x slice now (:func:`plan` lists the jobs,
:func:`run_planned` runs one, :func:`compute_one` loads, partitions and writes), in this
process or as Ray tasks. :func:`submit` queues one checkpoint x slice in the store's
``jobs`` table instead (idempotently: the same file content, slice, options and loading
options make the same job), for the workers of :mod:`geomstore.worker` to run;
:func:`job_table` lists the queue and :func:`retry_failed` puts failed jobs back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import duckdb
import pyarrow as pa

from geomstore._aliases import renamed_kwargs
from geomstore.engine.partition import Partition, partition, resolve_device
from geomstore.errors import ExecutorError, GeomstoreError
from geomstore.loading import ModelSpec, check_spec, file_sha256
from geomstore.slice import Slice
from geomstore.store.sqlutil import _hash, _retry, transaction
from geomstore.store.store import Store

if TYPE_CHECKING:
    from geomstore.worker import Job, Worker

__all__ = [
    "JOB_STATUSES",
    "ComputeSummary",
    "Job",
    "JobResult",
    "Worker",
    "checkpoint_meta",
    "compute",
    "compute_one",
    "job_table",
    "retry_failed",
    "submit",
]

PARTITION_OPTIONS = ("tol", "threshold", "levels", "output")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def checkpoint_meta(path: str | Path) -> tuple[str, int | None, dict[str, float]]:
    """Name, step and metrics of a checkpoint file.

    The name is the file's stem; the step is the last number in it (``step-0300.pt`` ->
    300); a JSON file beside it with the same stem (``step-0300.json``) may give
    ``{"step": ..., "metrics": {...}}``.

    >>> checkpoint_meta("runs/ckpt/step-0300.pt")
    ('step-0300', 300, {})
    """
    p = Path(path)
    numbers = re.findall(r"\d+", p.stem)
    step = int(numbers[-1]) if numbers else None
    metrics: dict[str, float] = {}
    side = p.with_suffix(".json")
    if side.is_file() and side != p:
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            raise GeomstoreError(f"cannot read the checkpoint's metadata {side}: {exc}") from None
        step = meta.get("step", step)
        metrics = {str(k): float(v) for k, v in (meta.get("metrics") or {}).items()}
    return p.stem, step, metrics


def compute_one(
    store: Store,
    spec: ModelSpec,
    sl: Slice,
    *,
    model: str,
    checkpoint: str,
    step: int | None = None,
    metrics: dict[str, float] | None = None,
    verify: bool = False,
    device: str = "auto",
    options: dict[str, Any] | None = None,
    before_commit: Callable[[duckdb.DuckDBPyConnection, str], bool] | None = None,
    source: str | None = None,
    progress: Callable[[Any], None] | None = None,
    replace: bool = False,
) -> tuple[str, Partition, bool | None]:
    """Load one checkpoint, partition it on one slice, write it; (partition id, it, verified).

    ``source`` is what the store records as the checkpoint's file (default ``spec.path``;
    a Ray task loads a temporary copy of the file but records the original). ``replace``
    as in :meth:`Store.add <geomstore.store.store.Store.add>`.
    """
    net = spec.load(sl.input_shape)
    part = partition(net, sl, device=device, **{"progress": progress, **(options or {})})
    verified = part.verify(net).ok if verify else None
    pid = store.add(
        part,
        model=model,
        checkpoint=checkpoint,
        step=step,
        source=source or spec.path,
        metrics=metrics,
        verified=verified,
        replace=replace,
        before_commit=before_commit,
    )
    return pid, part, verified


@dataclass(frozen=True)
class JobResult:
    """What one checkpoint x slice came to: a partition id, or the error that stopped it."""

    checkpoint: str
    slice: str | None
    path: str
    partition_id: str | None = None
    n_regions: int | None = None
    seconds: float | None = None
    device: str | None = None
    verified: bool | None = None
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the partition was written (or was already there)."""
        return self.error is None

    def line(self) -> str:
        """One line for a log or a progress bar."""
        what = f"{self.checkpoint} x {self.slice or 'slice'}"
        if self.error is not None:
            return f"{what}: FAILED {self.error_type}: {self.error}"
        ver = (
            "" if self.verified is None else ("  verified" if self.verified else "  VERIFY FAILED")
        )
        return (
            f"{what}: {self.n_regions} regions, {self.seconds or 0.0:.2f} s on {self.device} "
            f"-> partition {self.partition_id}{ver}"
        )


@dataclass
class ComputeSummary:
    """The results of :func:`compute`, one per checkpoint x slice, in submission order."""

    results: list[JobResult]
    executor: str
    seconds: float

    @property
    def done(self) -> list[JobResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.results if not r.ok]

    @property
    def partition_ids(self) -> list[str]:
        return [r.partition_id for r in self.results if r.partition_id is not None]

    def __str__(self) -> str:
        bad = sum(r.verified is False for r in self.results)
        return (
            f"{len(self.done)} of {len(self.results)} partition(s) stored, "
            f"{len(self.failed)} failed"
            + (f", {bad} failed verification" if bad else "")
            + f", in {self.seconds:.1f} s ({self.executor})"
        )


@dataclass(frozen=True)
class PlannedJob:
    """One checkpoint file x one slice, with the file's name, step and metrics."""

    path: str
    checkpoint: str
    step: int | None
    metrics: dict[str, float]
    slice: Slice


Executor = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = ("local", "ray")


def plan(
    checkpoints: str | Path | Sequence[str | Path], slices: Slice | Sequence[Slice]
) -> list[PlannedJob]:
    """Every checkpoint x slice once (duplicates dropped), names from :func:`checkpoint_meta`."""
    files = [checkpoints] if isinstance(checkpoints, str | Path) else list(checkpoints)
    sls = [slices] if isinstance(slices, Slice) else list(slices)
    if not files:
        raise GeomstoreError("give at least one checkpoint file.")
    if not sls:
        raise GeomstoreError("give at least one slice.")
    jobs: dict[tuple[str, str], PlannedJob] = {}
    for f in files:
        p = Path(f).resolve()
        if not p.is_file():
            raise GeomstoreError(f"checkpoint file {f} does not exist.")
        name, step, metrics = checkpoint_meta(p)
        for sl in sls:
            jobs.setdefault((str(p), sl.content_hash), PlannedJob(str(p), name, step, metrics, sl))
    return list(jobs.values())


def compute(
    store: Store,
    checkpoints: str | Path | Sequence[str | Path],
    slices: Slice | Sequence[Slice],
    *,
    model: str,
    factory: str | None = None,
    trust_pickle: bool = False,
    verify: bool = False,
    device: str = "auto",
    options: dict[str, Any] | None = None,
    executor: Executor = "local",
    address: str | None = None,
    on_result: Callable[[JobResult], None] | None = None,
    replace: bool = False,
) -> ComputeSummary:
    """Partition checkpoint files on slices and store them: here, or as Ray tasks.

    Each checkpoint x slice is one job. Its name, step and metrics come from the file
    (:func:`checkpoint_meta`). A job that fails (a bad file, an unsupported layer) is
    reported in its :class:`JobResult` and the others go on. Partition ids derive from the
    content (weights, slice, settings), so computing a checkpoint again writes nothing new.

    Parameters
    ----------
    store : Store
        Where the partitions go. With ``executor="ray"`` every Ray worker opens it too: a
        store directory on a shared file system, or a ``postgres:`` catalog with its data
        path in S3 (workers read the S3 settings from their own environment).
    checkpoints : path or sequence of paths
        Checkpoint files (``torch.export`` programs, weights with ``factory``, TorchScript),
        loaded with :mod:`geomstore.loading`, never unpickled unless ``trust_pickle``.
    slices : Slice or sequence of Slice
    model : str
        The model's name in the store.
    executor : {"local", "ray"}
        ``"local"`` computes in this process, one job after another; ``"ray"`` runs one
        Ray task per job (see :func:`geomstore.distributed.compute_ray`).
    address : str, optional
        The Ray cluster to join (``ray.init(address=...)``: ``"host:6379"``, or
        ``"ray://host:10001"`` through Ray Client); default ``$RAY_ADDRESS``, else the
        cluster ``ray start`` left on this machine, else a new local one. A head that does
        not answer within a few seconds raises :class:`ExecutorError`. Only with
        ``executor="ray"``.
    on_result : callable, optional
        Called with each :class:`JobResult` as it finishes (a progress bar).
    replace : bool
        A checkpoint name stored already with other weights is replaced (with all its
        partitions) instead of failing its jobs with
        :class:`~geomstore.errors.CheckpointConflictError`.

    Examples
    --------
    >>> import tempfile, torch, geomstore
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> d = tempfile.mkdtemp()
    >>> torch.export.save(torch.export.export(net, (torch.zeros(1, 2),)), d + "/step-5.pt2")
    >>> box = geomstore.Slice.box((-1, -1), (1, 1))
    >>> with geomstore.open(d + "/store") as store:
    ...     res = geomstore.compute(store, [d + "/step-5.pt2"], box, model="toy", device="cpu")
    >>> len(res.done), res.results[0].checkpoint
    (1, 'step-5')
    """
    if executor not in EXECUTORS:
        raise ExecutorError(
            f"executor={executor!r} is not one of {', '.join(map(repr, EXECUTORS))}; "
            'pick one ("ray" needs pip install geomstore[ray]).'
        )
    if address is not None and executor != "ray":
        raise ExecutorError("address= names a Ray cluster: give it with executor='ray'.")
    if store.read_only:
        raise GeomstoreError("this store is open read-only; open it for writing to compute.")
    if executor == "local":
        resolve_device(device)  # once, not as every job's failure (Ray workers decide there)
    jobs = plan(checkpoints, slices)
    opts = dict(options or {})
    start = time.monotonic()
    if executor == "ray":
        from geomstore.distributed import compute_ray

        results = compute_ray(
            store,
            jobs,
            model=model,
            factory=factory,
            trust_pickle=trust_pickle,
            verify=verify,
            device=device,
            options=opts,
            address=address,
            on_result=on_result,
            replace=replace,
        )
        return ComputeSummary(results, "ray", time.monotonic() - start)
    results = []
    for job in jobs:
        result = run_planned(
            store, job, model, factory, trust_pickle, verify, device, opts, replace=replace
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return ComputeSummary(results, "local", time.monotonic() - start)


def run_planned(
    store: Store,
    job: PlannedJob,
    model: str,
    factory: str | None,
    trust_pickle: bool,
    verify: bool,
    device: str,
    options: dict[str, Any],
    *,
    load_from: str | None = None,
    replace: bool = False,
) -> JobResult:
    """Compute and store one planned job; any failure becomes the result's ``error``.

    ``load_from`` is a local copy of ``job.path`` to load instead (a Ray task's).
    """
    sl_name = job.slice.name
    try:
        pid, part, verified = compute_one(
            store,
            ModelSpec(load_from or job.path, factory, trust_pickle),
            job.slice,
            model=model,
            checkpoint=job.checkpoint,
            step=job.step,
            metrics=job.metrics,
            verify=verify,
            device=device,
            options=options,
            source=job.path,
            replace=replace,
        )
    except Exception as exc:
        error = str(exc)
        if load_from is not None:  # name the user's file, not the worker's private copy
            error = error.replace(load_from, job.path)
        return JobResult(
            job.checkpoint, sl_name, job.path, error=error, error_type=type(exc).__name__
        )
    return JobResult(
        job.checkpoint,
        sl_name,
        job.path,
        partition_id=pid,
        n_regions=part.n_regions,
        seconds=part.seconds,
        device=str(part.settings.get("device")),
        verified=verified,
    )


@renamed_kwargs(sl="slice")
def submit(
    store: Store,
    spec: ModelSpec | str | os.PathLike[str],
    slice: Slice,
    *,
    model: str,
    checkpoint: str | None = None,
    step: int | None = None,
    metrics: dict[str, float] | None = None,
    verify: bool = False,
    options: dict[str, Any] | None = None,
    replace: bool = False,
) -> str:
    """Queue one checkpoint x slice for the workers; returns the job id.

    Name, step and metrics default to :func:`checkpoint_meta` of the file. Submitting the
    same file content, slice, options, loading options (``spec.factory``,
    ``spec.trust_pickle``), ``verify`` and ``replace`` again returns the existing job;
    other ones make a new job (a file that failed for want of ``trust_pickle`` can be
    submitted with it, one computed unverified can be submitted with ``verify``).
    """
    if store.read_only:
        raise GeomstoreError("this store is open read-only; open it for writing to submit.")
    if isinstance(spec, str | os.PathLike):  # a file alone: loaded as load_model() would
        spec = ModelSpec(os.fspath(spec))
    if not isinstance(spec, ModelSpec):
        raise GeomstoreError(
            f"submit takes a checkpoint file or a geomstore.ModelSpec(path, factory, "
            f"trust_pickle); got {type(spec).__name__}."
        )
    path = Path(spec.path).resolve()
    if not path.is_file():
        raise GeomstoreError(f"checkpoint file {path} does not exist.")
    check_spec(ModelSpec(str(path), spec.factory, spec.trust_pickle))  # not a doomed job
    name, file_step, file_metrics = checkpoint_meta(path)
    opts = {k: v for k, v in (options or {}).items() if k in PARTITION_OPTIONS}
    spec = ModelSpec(str(path), spec.factory, spec.trust_pickle)
    sha = file_sha256(path)
    # the loading options are part of the job: a job that failed for want of trust_pickle
    # is submitted again with it as a new job (without it, ids are as they always were)
    trusted: tuple[str, ...] = ("trust_pickle",) if spec.trust_pickle else ()
    trusted += ("replace",) if replace else ()
    trusted += ("verify",) if verify else ()  # a verified job is another job
    job_id = _hash(
        "job", model, checkpoint or name, sha, spec.factory, slice.content_hash, opts, *trusted
    )
    body = {
        "model": spec.to_dict(),
        "sha256": sha,
        "slice": slice.to_dict(),
        "metrics": metrics if metrics is not None else file_metrics,
        "verify": verify,
        "options": opts,
        **({"replace": True} if replace else {}),
    }

    def write() -> str:
        with transaction(store.con) as con:
            row = con.execute("SELECT count(*) FROM jobs WHERE job_id = ?", [job_id]).fetchone()
            if row is not None and row[0] == 0:
                con.execute(
                    "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, 'queued', 0, NULL, NULL, NULL, "
                    "NULL, NULL, NULL, ?)",
                    [
                        job_id,
                        model,
                        checkpoint or name,
                        step if step is not None else file_step,
                        json.dumps(body, sort_keys=True),
                        _now(),
                    ],
                )
        return job_id

    with store.exclusive():  # two submitters of one job on a shared catalog: one row
        return _retry(write)


JOB_STATUSES = ("queued", "running", "done", "failed")


def job_table(
    store: Store, *, status: str | None = None, model: str | None = None, job_id: str | None = None
) -> pa.Table:
    """The jobs with their status, attempts, worker, error and partition id, oldest first.

    ``status``, ``model`` and ``job_id`` keep only the matching jobs. Read through the
    store's read path, so a read-only store and the query service list them too.

    Examples
    --------
    >>> import tempfile, geomstore
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     job_table(store, status="queued").num_rows
    0
    """
    if status is not None and status not in JOB_STATUSES:
        raise GeomstoreError(f"status must be one of {', '.join(JOB_STATUSES)}; got {status!r}.")
    where, params = [], []
    for column, value in (("status", status), ("model", model), ("job_id", job_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    sql = (
        "SELECT job_id, model, checkpoint, step, status, attempts, worker, claimed_at, "
        "finished_at, error, partition_id, created_at FROM jobs"
    )
    if where:
        sql += " WHERE " + " AND ".join(where)
    return store.reader().execute(sql + " ORDER BY created_at, job_id", params).to_arrow_table()


def retry_failed(store: Store) -> int:
    """Put failed jobs back in the queue with a fresh attempt count; returns how many."""

    def write() -> int:
        row = store.con.execute(
            "UPDATE jobs SET status = 'queued', attempts = 0, token = NULL, worker = NULL "
            "WHERE status = 'failed'"
        ).fetchone()
        return int(row[0]) if row else 0

    return _retry(write)


def __getattr__(name: str) -> Any:
    """``Job`` and ``Worker``, which moved to :mod:`geomstore.worker`, from their old home.

    Looked up on first use: :mod:`geomstore.worker` imports this module.
    """
    if name in ("Job", "Worker"):
        from geomstore import worker

        return getattr(worker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
