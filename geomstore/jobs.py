"""The compute queue: jobs stored in the store, run by workers that share it.

A job is one checkpoint file x one slice. ``submit`` adds it (idempotently: the same file
content, slice and options make the same job). A :class:`Worker` claims the oldest queued
job in a transaction that updates its row (two workers claiming from the same snapshot
cannot both commit: the loser retries and sees the job taken), computes the partition,
and writes it in one transaction that also marks the job done, so a job is done exactly
once. While it computes, a heartbeat thread touches a file in the store's ``heartbeats/``
folder (directory stores: a commit to their SQLite catalog would abort the other
workers' open writes) or appends to ``job_heartbeats`` (other catalogs); a running job
whose heartbeat is older than ``stale_after`` seconds is claimed again by another worker.
A job that fails with a user error (a bad model file, an unsupported layer) is marked
failed at once; other failures are retried up to ``max_attempts`` claims. SIGTERM or
Ctrl-C during a computation releases the job (back to the queue) and stops the worker.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow as pa

from geomstore._aliases import renamed_kwargs
from geomstore.engine.partition import Partition, partition
from geomstore.errors import (
    AbortedWriteError,
    ExecutorError,
    GeomstoreError,
    InvalidSliceError,
    ModelShapeError,
    UnsupportedModelError,
)
from geomstore.loading import ModelLoadError, ModelSpec, file_sha256
from geomstore.slice import Slice
from geomstore.store.sqlutil import ALIAS, _hash, _retry, transaction
from geomstore.store.store import Store

__all__ = [
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
# failures that another attempt cannot fix: the job is marked failed at once
_USER_ERRORS = (ModelLoadError, UnsupportedModelError, ModelShapeError, InvalidSliceError)


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
) -> tuple[str, Partition, bool | None]:
    """Load one checkpoint, partition it on one slice, write it; (partition id, it, verified).

    ``source`` is what the store records as the checkpoint's file (default ``spec.path``;
    a Ray task loads a temporary copy of the file but records the original).
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
        The Ray cluster to join (``ray.init(address=...)``; default ``$RAY_ADDRESS`` or a
        new local cluster). Only with ``executor="ray"``.
    on_result : callable, optional
        Called with each :class:`JobResult` as it finishes (a progress bar).

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
        )
        return ComputeSummary(results, "ray", time.monotonic() - start)
    results = []
    for job in jobs:
        result = run_planned(store, job, model, factory, trust_pickle, verify, device, opts)
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
        )
    except Exception as exc:
        return JobResult(
            job.checkpoint, sl_name, job.path, error=str(exc), error_type=type(exc).__name__
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
    spec: ModelSpec,
    slice: Slice,
    *,
    model: str,
    checkpoint: str | None = None,
    step: int | None = None,
    metrics: dict[str, float] | None = None,
    verify: bool = False,
    options: dict[str, Any] | None = None,
) -> str:
    """Queue one checkpoint x slice for the workers; returns the job id.

    Name, step and metrics default to :func:`checkpoint_meta` of the file. Submitting the
    same file content, slice and options again returns the existing job.
    """
    if store.read_only:
        raise GeomstoreError("this store is open read-only; open it for writing to submit.")
    path = Path(spec.path).resolve()
    if not path.is_file():
        raise GeomstoreError(f"checkpoint file {path} does not exist.")
    name, file_step, file_metrics = checkpoint_meta(path)
    opts = {k: v for k, v in (options or {}).items() if k in PARTITION_OPTIONS}
    spec = ModelSpec(str(path), spec.factory, spec.trust_pickle)
    sha = file_sha256(path)
    job_id = _hash("job", model, checkpoint or name, sha, spec.factory, slice.content_hash, opts)
    body = {
        "model": spec.to_dict(),
        "sha256": sha,
        "slice": slice.to_dict(),
        "metrics": metrics if metrics is not None else file_metrics,
        "verify": verify,
        "options": opts,
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

    return _retry(write)


def job_table(store: Store) -> pa.Table:
    """The jobs with their status, attempts, worker, error and partition id, oldest first."""
    return store.con.execute(
        "SELECT job_id, model, checkpoint, step, status, attempts, worker, claimed_at, "
        "finished_at, error, partition_id FROM jobs ORDER BY created_at, job_id"
    ).to_arrow_table()


def retry_failed(store: Store) -> int:
    """Put failed jobs back in the queue with a fresh attempt count; returns how many."""

    def write() -> int:
        row = store.con.execute(
            "UPDATE jobs SET status = 'queued', attempts = 0, token = NULL, worker = NULL "
            "WHERE status = 'failed'"
        ).fetchone()
        return int(row[0]) if row else 0

    return _retry(write)


@dataclass(frozen=True)
class Job:
    """A claimed job."""

    job_id: str
    model: str
    checkpoint: str
    step: int | None
    spec: dict[str, Any]
    attempts: int
    token: str


class _Stop(BaseException):
    """Raised in the worker's main thread by SIGTERM / SIGINT while a job computes."""


def _beat_dir(store: Store) -> Path | None:
    """Directory stores keep heartbeats as files: a commit to their SQLite catalog would
    abort every open write transaction (the partition being written) of every worker."""
    return Path(store.target) / "heartbeats" if store.kind == "ducklake" else None


def _last_beat(store: Store, token: str | None) -> dt.datetime | None:
    d = _beat_dir(store)
    if d is None or token is None:
        return None
    try:
        return dt.datetime.fromtimestamp((d / token).stat().st_mtime, dt.UTC).replace(tzinfo=None)
    except OSError:
        return None


class _Heartbeat(threading.Thread):
    def __init__(self, store: Store, token: str, interval: float) -> None:
        super().__init__(daemon=True, name=f"geomstore-heartbeat-{token[:8]}")
        self.dir = _beat_dir(store)
        self.con = store.con.cursor() if self.dir is None else None
        self.token = token
        self.interval = interval
        self.halt = threading.Event()
        if self.dir is not None:
            self.dir.mkdir(exist_ok=True)
            (self.dir / token).touch()

    def _beat(self) -> None:
        if self.dir is not None:
            with contextlib.suppress(OSError):
                (self.dir / self.token).touch()
            return
        assert self.con is not None
        con = self.con
        with contextlib.suppress(duckdb.Error, GeomstoreError):
            _retry(
                lambda: con.execute(
                    f"INSERT INTO {ALIAS}.job_heartbeats VALUES (?, ?)", [self.token, _now()]
                ),
                attempts=5,
            )

    def run(self) -> None:
        try:
            while not self.halt.wait(self.interval):
                self._beat()
        finally:
            if self.con is not None:
                self.con.close()

    def stop(self) -> None:
        self.halt.set()
        self.join()
        if self.dir is not None:
            with contextlib.suppress(OSError):
                (self.dir / self.token).unlink()


@dataclass
class Worker:
    """Runs the store's queued jobs; see the module docstring for the protocol.

    Examples
    --------
    >>> import tempfile, torch, geomstore
    >>> from geomstore.jobs import Worker, submit
    >>> from geomstore.loading import ModelSpec
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> d = tempfile.mkdtemp()
    >>> torch.export.save(torch.export.export(net, (torch.zeros(1, 2),)), d + "/step-1.pt2")
    >>> with geomstore.open(d + "/store") as store:
    ...     job = submit(store, ModelSpec(d + "/step-1.pt2"), geomstore.Slice.box((-1, -1), (1, 1)),
    ...                  model="toy")
    ...     Worker(store, device="cpu").run(once=True)["done"]
    1
    """

    store: Store
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    device: str = "auto"
    heartbeat: float = 5.0
    stale_after: float = 60.0
    max_attempts: int = 3
    last: str = field(default="", init=False)  # what the last finished job computed
    _interruptible: bool = field(default=False, init=False, repr=False)
    _stop_requested: bool = field(default=False, init=False, repr=False)

    # the protocol ----------------------------------------------------------------------------
    def claim(self) -> Job | None:
        """Claim the oldest queued (or abandoned) job, or None when there is none."""
        con = self.store.con
        cutoff = _now() - dt.timedelta(seconds=self.stale_after)

        def txn() -> Job | None:
            claimed = None
            with transaction(con):
                # the oldest queued job first, then the running ones (few: one per worker)
                rows = con.execute(
                    "WITH cand AS ((SELECT * FROM jobs WHERE status = 'queued' "
                    "ORDER BY created_at, job_id LIMIT 1) UNION ALL "
                    "(SELECT * FROM jobs WHERE status = 'running')) "
                    "SELECT j.job_id, j.model, j.checkpoint, j.step, j.spec, j.status, "
                    "j.attempts, j.token, greatest(coalesce(h.beat, j.claimed_at), j.claimed_at) "
                    "FROM cand j LEFT JOIN (SELECT token, max(beat_at) AS beat "
                    "FROM job_heartbeats WHERE token IN (SELECT token FROM cand) "
                    "GROUP BY token) h ON h.token = j.token "
                    "ORDER BY j.status = 'running', j.created_at, j.job_id"
                ).fetchall()
                for job_id, model, ckpt, step, spec, status, attempts, token, beat in rows:
                    if status == "running":
                        file_beat = _last_beat(self.store, token)
                        last = max(b for b in (beat, file_beat) if b is not None)
                        if last >= cutoff:
                            continue  # alive
                        if attempts >= self.max_attempts:
                            con.execute(
                                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? "
                                "WHERE job_id = ? AND token = ?",
                                [
                                    _now(),
                                    f"its worker stopped responding {attempts} times",
                                    job_id,
                                    token,
                                ],
                            )
                            continue
                    new = uuid.uuid4().hex
                    con.execute(
                        "UPDATE jobs SET status = 'running', attempts = attempts + 1, "
                        "worker = ?, token = ?, claimed_at = ? WHERE job_id = ?",
                        [self.name, new, _now(), job_id],
                    )
                    claimed = Job(job_id, model, ckpt, step, json.loads(spec), attempts + 1, new)
                    break
            return claimed

        return _retry(txn)

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        def write() -> None:
            self.store.con.execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ? "
                "WHERE job_id = ? AND token = ? AND status = 'running'",
                [status, error, _now(), job.job_id, job.token],
            )

        _retry(write)

    def release(self, job: Job) -> None:
        """Give a claimed job back to the queue (its attempt does not count)."""

        def write() -> None:
            self.store.con.execute(
                "UPDATE jobs SET status = 'queued', attempts = attempts - 1, worker = NULL, "
                "token = NULL WHERE job_id = ? AND token = ? AND status = 'running'",
                [job.job_id, job.token],
            )

        _retry(write)

    # called with (job, the engine's Progress) while a job's partition runs
    on_progress: Callable[[Job, Any], None] | None = field(default=None, init=False, repr=False)

    def run_one(self, job: Job) -> str:
        """Compute and write one claimed job: 'done', 'retry', 'failed' or 'lost'."""
        beat = _Heartbeat(self.store, job.token, self.heartbeat)
        beat.start()
        try:

            def mark_done(con: duckdb.DuckDBPyConnection, pid: str) -> bool:
                row = con.execute(
                    "UPDATE jobs SET status = 'done', partition_id = ?, finished_at = ?, "
                    "error = NULL WHERE job_id = ? AND token = ? AND status = 'running'",
                    [pid, _now(), job.job_id, job.token],
                ).fetchone()
                return row is not None and row[0] == 1

            spec = job.spec
            self._interruptible = True  # an interrupted write rolls back; the job is released
            _, part, _ = compute_one(
                self.store,
                ModelSpec.from_dict(spec["model"]),
                Slice.from_dict(spec["slice"]),
                model=job.model,
                checkpoint=job.checkpoint,
                step=job.step,
                metrics=spec.get("metrics"),
                verify=bool(spec.get("verify")),
                device=self.device,
                options=spec.get("options"),
                before_commit=mark_done,
                progress=None if self.on_progress is None else partial(self.on_progress, job),
            )
            self._interruptible = False
            self.last = (
                f"{part.n_regions} regions, {part.seconds:.2f} s on {part.settings['device']}"
            )
            return "done"
        except _Stop:
            self._interruptible = False
            self.release(job)
            raise
        except AbortedWriteError:
            return "lost"  # another worker took the job over (this one looked dead)
        except Exception as exc:
            self._interruptible = False
            permanent = isinstance(exc, _USER_ERRORS) or job.attempts >= self.max_attempts
            self._finish(job, "failed" if permanent else "queued", f"{type(exc).__name__}: {exc}")
            return "failed" if permanent else "retry"
        finally:
            self._interruptible = False
            beat.stop()

    # the loop --------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_requested = True
        if self._interruptible:
            raise _Stop()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def run(
        self,
        *,
        once: bool = False,
        max_jobs: int | None = None,
        poll: float = 2.0,
        on_event: Callable[[Job, str], None] | None = None,
    ) -> dict[str, int]:
        """Run jobs until stopped (SIGTERM / Ctrl-C), or the queue is empty with ``once``.

        Returns the count of each outcome ('done', 'retry', 'failed', 'lost', 'released').
        """
        counts = {"done": 0, "retry": 0, "failed": 0, "lost": 0, "released": 0}
        with self._signals():
            while not self._stop_requested:
                job = self.claim()
                if job is None:
                    if once:
                        break
                    try:
                        self._interruptible = True
                        time.sleep(poll)
                    except _Stop:
                        break
                    finally:
                        self._interruptible = False
                    continue
                try:
                    outcome = self.run_one(job)
                except _Stop:
                    counts["released"] += 1
                    if on_event is not None:
                        on_event(job, "released")
                    break
                counts[outcome] += 1
                if on_event is not None:
                    on_event(job, outcome)
                if max_jobs is not None and counts["done"] + counts["failed"] >= max_jobs:
                    break
        return counts


def stable_files(folder: Path, pattern: str, sizes: dict[Path, tuple[int, float]]) -> list[Path]:
    """Files matching ``pattern`` whose size and mtime did not change since the last call.

    ``sizes`` carries what the previous call saw; a file still being written is held back.
    """
    ready = []
    for p in sorted(folder.glob(pattern)):
        if not p.is_file():
            continue
        st = p.stat()
        now = (st.st_size, st.st_mtime)
        if sizes.get(p) == now:
            ready.append(p)
        sizes[p] = now
    return ready
