"""The queue's worker side: :class:`Worker` claims jobs from the store and computes them.

A job is one checkpoint file x one slice, queued by :func:`geomstore.jobs.submit`. A
:class:`Worker` claims the oldest queued job in a transaction that updates its row (two
workers claiming from the same snapshot cannot both commit: the loser retries and sees the
job taken), computes the partition, and writes it in one transaction that also marks the
job done, so a job is done exactly once. While it computes, a heartbeat thread touches a
file in the store's ``heartbeats/`` folder (directory stores: a commit to their SQLite
catalog would abort the other workers' open writes) or appends to ``job_heartbeats``
(other catalogs); a running job whose heartbeat is older than ``stale_after`` seconds is
claimed again by another worker. A job that fails with a user error (a bad model file, an
unsupported layer) is marked failed at once; other failures are retried up to
``max_attempts`` claims. SIGTERM or Ctrl-C during a computation releases the job (back to
the queue) and stops the worker. :func:`stable_files` is what ``geomstore watch`` submits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import duckdb

from geomstore.errors import (
    AbortedWriteError,
    CheckpointConflictError,
    GeomstoreError,
    InvalidSliceError,
    ModelShapeError,
    UnsupportedModelError,
)
from geomstore.jobs import _now, compute_one
from geomstore.loading import ModelLoadError, ModelSpec
from geomstore.slice import Slice
from geomstore.store.sqlutil import ALIAS, _retry, transaction
from geomstore.store.store import Store

__all__ = ["Job", "Worker", "stable_files"]

# failures that another attempt cannot fix: the job is marked failed at once
_USER_ERRORS = (
    ModelLoadError,
    UnsupportedModelError,
    ModelShapeError,
    InvalidSliceError,
    CheckpointConflictError,  # another run under the name: --replace, not a retry, helps
)


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


def _forget_beat(store: Store, token: str | None) -> None:
    """Remove a dead worker's heartbeat file (directory stores)."""
    d = _beat_dir(store)
    if d is not None and token:
        with contextlib.suppress(OSError):
            (d / token).unlink()


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
    >>> from geomstore.jobs import submit
    >>> from geomstore.loading import ModelSpec
    >>> from geomstore.worker import Worker
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

    def __post_init__(self) -> None:
        from geomstore.engine.partition import resolve_device

        resolve_device(self.device)  # a device this machine lacks: refused now, not per job

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
                        _forget_beat(self.store, token)  # its worker died: no file left
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
                replace=bool(spec.get("replace")),
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
