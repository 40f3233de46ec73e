"""Partitions computed on a Ray cluster: one Ray task per checkpoint x slice.

The driver (:func:`compute_ray`, behind ``geomstore.compute(..., executor="ray")`` and
``geomstore compute --ray``) reads each checkpoint file once and puts its bytes in Ray's
object store, so workers need no shared file system for the checkpoints; a task writes
them to a private temporary file and loads it with :mod:`geomstore.loading` (export
programs, weights + factory, TorchScript; pickles only with ``trust_pickle``): no Python
module is ever pickled. Each task opens the store itself (once per worker process) and
writes its partition in one transaction, so the store must be reachable from every worker:
a ``postgres:`` catalog with its data path in S3 (or on a shared file system), or a store
directory on a shared file system.

Exactly once: a task whose worker dies is retried by Ray (``max_retries``); its partition
id derives from the content (weights, slice, settings), so when the dead attempt had
committed, the retry's write is a no-op, and when it had not, nothing of it is visible (a
DuckLake transaction commits whole). A task that fails on its input (a bad file, an
unsupported layer) returns its error; the others go on. Tasks ask for ``num_gpus=1`` when
the cluster has GPUs, one CPU otherwise.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from geomstore.errors import ExecutorError
from geomstore.jobs import JobResult, PlannedJob, run_planned
from geomstore.slice import Slice
from geomstore.store.store import Store

__all__ = ["compute_ray", "ray_resources"]

# one open store per worker process, keyed by (target, data path)
_STORES: dict[tuple[str, str | None], Store] = {}


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ExecutorError(
            f"Ray is not installed ({exc}); install it with: pip install geomstore[ray]"
        ) from None
    return ray


def ray_resources(gpus: float) -> dict[str, float]:
    """The resources of one task: a whole GPU where the cluster has GPUs, else one CPU.

    >>> ray_resources(8), ray_resources(0)
    ({'num_gpus': 1, 'num_cpus': 1}, {'num_cpus': 1})
    """
    return {"num_gpus": 1, "num_cpus": 1} if gpus > 0 else {"num_cpus": 1}


def _worker_store(target: str, data_path: str | None) -> Store:
    key = (target, data_path)
    store = _STORES.get(key)
    if store is None:
        for old in _STORES.values():  # one store per worker: close the last one
            old.close()
        _STORES.clear()
        store = Store(target, data_path=data_path)
        _STORES[key] = store
    return store


def _task(
    target: str,
    data_path: str | None,
    blob: bytes | None,
    job: dict[str, Any],
    settings: dict[str, Any],
    *after: Any,
) -> dict[str, Any]:
    """One checkpoint x slice, in a Ray worker; returns the JobResult's fields.

    ``after`` are the results of the tasks that must have written first (unused values:
    Ray starts this task once they are done; see :func:`_write_order`).
    """
    planned = PlannedJob(
        job["path"], job["checkpoint"], job["step"], job["metrics"], Slice.from_dict(job["slice"])
    )
    try:
        store = _worker_store(target, data_path)
    except Exception as exc:  # the store is unreachable from this worker: say so per job
        return JobResult(
            planned.checkpoint,
            planned.slice.name,
            planned.path,
            error=f"cannot open the store from a Ray worker: {exc}",
            error_type=type(exc).__name__,
        ).__dict__
    args = (
        store,
        planned,
        settings["model"],
        settings["factory"],
        settings["trust_pickle"],
        settings["verify"],
        settings["device"],
        settings["options"],
    )
    replace = bool(settings.get("replace"))
    if blob is None:  # a shared file system: load the file where it is
        return run_planned(*args, replace=replace).__dict__
    suffix = "".join(Path(planned.path).suffixes[-2:]) or ".pt"
    with tempfile.TemporaryDirectory(prefix="geomstore-ray-") as tmp:
        local = Path(tmp) / f"checkpoint{suffix}"
        local.write_bytes(blob)
        return run_planned(*args, load_from=str(local), replace=replace).__dict__


def _payload(job: PlannedJob) -> dict[str, Any]:
    """A planned job as plain data for a Ray task (:func:`_task` rebuilds it)."""
    return {
        "path": job.path,
        "checkpoint": job.checkpoint,
        "step": job.step,
        "metrics": job.metrics,
        "slice": job.slice.to_dict(),
    }


def _write_order(jobs: list[PlannedJob]) -> list[list[int]]:
    """For each job, the earlier jobs it waits for, so that no catalog row is written twice.

    ``Store.add`` inserts a partition's model, checkpoint and slice rows when they are not
    there yet, and DuckLake has no unique keys: two tasks committing the same new row at
    once would both insert it. So the first job writes alone (the model row), the first job
    of each checkpoint and of each slice write those rows, and every other job of that
    checkpoint or slice waits for them. The rest run in parallel.

    >>> from geomstore import Slice
    >>> a, b = Slice.box((0, 0), (1, 1)), Slice.box((0, 0), (2, 2))
    >>> jobs = [PlannedJob(p, p, None, {}, s) for p in ("x", "y") for s in (a, b)]
    >>> _write_order(jobs)
    [[], [0], [0], [0, 2, 1]]
    """
    first_ckpt: dict[str, int] = {}
    first_slice: dict[str, int] = {}
    order = []
    for i, job in enumerate(jobs):
        c = first_ckpt.setdefault(job.path, i)
        s = first_slice.setdefault(job.slice.content_hash, i)
        deps = [d for d in dict.fromkeys((0, c, s)) if d != i]
        order.append(deps)
    return order


#: Seconds to wait for a Ray head's port to accept a TCP connection before ``ray.init``,
#: which itself waits minutes (or for ever) for a head that is not there.
CONNECT_TIMEOUT = 5.0
_HEAD = re.compile(r"^(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[^:/\s]+):(\d{1,5})/?$")
_HINT = "check the address (ray://host:10001 or host:6379) and that the cluster is up"


def _head(address: str) -> tuple[str, int] | None:
    """The (host, port) of a ``host:port`` or ``ray://host:port`` address, else None.

    >>> _head("ray://head:10001"), _head("10.0.0.5:6379"), _head("auto")
    (('head', 10001), ('10.0.0.5', 6379), None)
    """
    m = _HEAD.match(address.strip())
    return None if m is None else (m.group(1).strip("[]"), int(m.group(2)))


def _unreachable(host: str, port: int) -> str | None:
    """Why nothing accepts a TCP connection at ``host:port`` within :data:`CONNECT_TIMEOUT`
    seconds, or None when something does."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _current_cluster() -> str | None:
    """The address in Ray's ``ray_current_cluster`` file (left by ``ray start``), or None."""
    tmp = os.environ.get("RAY_TMPDIR")
    if not tmp and sys.platform.startswith("linux"):
        tmp = os.environ.get("TMPDIR")
    folder = Path(tmp or ("/tmp" if os.name == "posix" else tempfile.gettempdir()))
    try:
        return (folder / "ray" / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def _join_address(address: str | None) -> str | None:
    """The address to hand ``ray.init``, once its head answers (a bounded wait).

    Resolved as Ray does: ``address``, else ``$RAY_ADDRESS``, else the cluster ``ray start``
    left on this machine, else a new local one. A current-cluster file whose head is gone
    gives a new local cluster (``"local"``), as no file would; a named head that does not
    answer within :data:`CONNECT_TIMEOUT` seconds raises :class:`ExecutorError`.
    """
    given = address
    if address in (None, "auto"):
        given = os.environ.get("RAY_ADDRESS") or address
    if given in (None, "auto"):
        current = _current_cluster()
        head = None if current is None else _head(current)
        if head is None or _unreachable(*head) is None:
            return address  # none recorded (a new local cluster) or one that answers
        if given is None:
            return "local"
        raise ExecutorError(
            f"cannot join the Ray cluster at {current} (from Ray's ray_current_cluster file): "
            f"nothing answers there within {CONNECT_TIMEOUT:g} s; start one (ray start "
            "--head), or give its address (--ray=host:6379, $RAY_ADDRESS)."
        )
    if given == "local":
        return address
    if given.startswith("ray://"):
        try:
            import grpc  # noqa: F401  # what Ray Client needs beyond Ray itself
        except ImportError:
            raise ExecutorError(
                f"joining {given} needs Ray Client, which is not installed: "
                'pip install "ray[client]" (or geomstore[ray]); or give the head\'s GCS '
                "address host:6379 instead."
            ) from None
    head = _head(given)
    why = None if head is None else _unreachable(*head)
    if head is not None and why is not None:
        named = given if given == address else f"{given} ($RAY_ADDRESS)"
        raise ExecutorError(
            f"cannot join the Ray cluster at {named}: nothing answers at {head[0]}:{head[1]} "
            f"within {CONNECT_TIMEOUT:g} s ({why}); {_HINT}."
        )
    return address


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _connect(address: str | None) -> bool:
    """Join (or start) a Ray cluster; True when this call started it."""
    ray = _ray()
    if ray.is_initialized():
        return False
    target = _join_address(address)
    try:
        ray.init(
            address=target,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
    except Exception as exc:
        raise ExecutorError(
            f"cannot join the Ray cluster at {address or '$RAY_ADDRESS / a new local one'} "
            f"({type(exc).__name__}: {_first_line(exc)}); {_HINT}."
        ) from None
    return True


def compute_ray(
    store: Store,
    jobs: list[PlannedJob],
    *,
    model: str,
    factory: str | None = None,
    trust_pickle: bool = False,
    verify: bool = False,
    device: str = "auto",
    options: dict[str, Any] | None = None,
    address: str | None = None,
    ship: str = "bytes",
    max_retries: int = 3,
    on_result: Callable[[JobResult], None] | None = None,
    poll: float = 0.5,
    replace: bool = False,
) -> list[JobResult]:
    """Run planned jobs as Ray tasks that write into ``store``; results in job order.

    ``ship="bytes"`` sends each checkpoint's bytes through Ray's object store (no shared
    file system needed); ``ship="path"`` lets workers open the files where they are. A
    task killed with its worker is retried up to ``max_retries`` times; after that its
    job reports the error. Use :func:`geomstore.compute` (``executor="ray"``) rather than
    this function directly.

    >>> # geomstore.compute(store, ckpts, slices, model="resnet", executor="ray")
    """
    refuse_duckdb(store.target)
    if ship not in ("bytes", "path"):
        raise ExecutorError(f"ship={ship!r} is not one of 'bytes', 'path'; pick one.")
    ray = _ray()
    started = _connect(address)
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        task = ray.remote(max_retries=max_retries, retry_exceptions=False)(_task)
        task = task.options(**ray_resources(gpus))
        target = _target(store)
        settings = {
            "model": model,
            "factory": factory,
            "trust_pickle": trust_pickle,
            "verify": verify,
            "device": device,
            "options": dict(options or {}),
            "replace": replace,
        }
        blobs: dict[str, Any] = {}
        refs: list[Any] = []
        after = _write_order(jobs)
        for i, job in enumerate(jobs):
            if ship == "bytes" and job.path not in blobs:
                blobs[job.path] = ray.put(Path(job.path).read_bytes())
            payload = _payload(job)
            blob = blobs.get(job.path)
            deps = [refs[d] for d in after[i]]
            refs.append(task.remote(target, store.data_path, blob, payload, settings, *deps))
        return _collect(ray, refs, jobs, on_result, poll)
    finally:
        if started:
            ray.shutdown()


def _result(ray: Any, ref: Any, job: PlannedJob) -> JobResult:
    """A finished task's JobResult; a task whose retries ran out reports its error."""
    try:
        return JobResult(**ray.get(ref))
    except Exception as exc:  # the task's retries ran out (its worker kept dying)
        return JobResult(
            job.checkpoint,
            job.slice.name,
            job.path,
            error=str(exc).splitlines()[0],
            error_type=type(exc).__name__,
        )


def _collect(
    ray: Any,
    refs: list[Any],
    jobs: list[PlannedJob],
    on_result: Callable[[JobResult], None] | None,
    poll: float,
) -> list[JobResult]:
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[JobResult | None] = [None] * len(refs)
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll)
        for ref in ready:
            i = index[ref]
            result = _result(ray, ref, jobs[i])
            results[i] = result
            if on_result is not None:
                on_result(result)
    return [r for r in results if r is not None]


def _target(store: Store) -> str:
    """The store as a worker opens it (a directory store by its absolute path)."""
    return store.target if store.kind != "ducklake" else str(Path(store.target).resolve())


def refuse_duckdb(target: str) -> None:
    """Ray workers write from other processes: a ``.duckdb`` store cannot take them."""
    if not target.startswith(("postgres:", "postgresql://")) and Path(target).suffix == ".duckdb":
        raise ExecutorError(
            "a .duckdb store belongs to one process, so Ray workers cannot write to it; use "
            "a store directory on a shared file system or a postgres: catalog."
        )


class _RayRecorder:
    """``Recorder(executor="ray")``: each recorded checkpoint becomes one Ray task per
    slice, submitted without waiting, in the write order of :func:`_write_order` (the
    first job writes the model row alone; each checkpoint's and each slice's first job
    writes that row before the jobs that share it)."""

    def __init__(self, rec: Any, *, address: str | None, max_retries: int) -> None:
        refuse_duckdb(rec.store.target)
        _ray()  # fail at construction, not at the first recorded step
        self.rec, self.address, self.max_retries = rec, address, max_retries
        self._task: Any = None
        self._started = False
        self._refs: list[Any] = []
        self._jobs: list[PlannedJob] = []
        self._done: dict[int, JobResult] = {}
        self._first_slice: dict[str, Any] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._settings = {
            "model": rec.model,
            "factory": None,
            "trust_pickle": False,
            "verify": rec.verify,
            "device": rec.device,
            "options": dict(rec.options),
            "replace": rec.replace,
        }

    def folder(self) -> Path:
        """Where the exported programs go: the recorder's folder, else a temporary one."""
        if self.rec.folder is not None:
            return Path(self.rec.folder)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="geomstore-recorder-")
        return Path(self._tmp.name)

    def _remote(self) -> Any:
        if self._task is None:
            ray = _ray()
            self._started = _connect(self.address)
            gpus = float(ray.cluster_resources().get("GPU", 0))
            task = ray.remote(max_retries=self.max_retries, retry_exceptions=False)(_task)
            self._task = task.options(**ray_resources(gpus))
        return self._task

    def submit(self, path: Path, step: int, metrics: dict[str, float]) -> list[str]:
        """Hand one exported checkpoint to Ray (its bytes, through the object store)."""
        ray = _ray()
        task = self._remote()
        blob = ray.put(path.read_bytes())
        if self.rec.folder is None:  # a temporary program: Ray holds its bytes now
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
        ids = []
        target = _target(self.rec.store)
        first_of_checkpoint = None
        for sl in self.rec.slices:
            job = PlannedJob(str(path), f"step-{step}", step, metrics, sl)
            deps = [self._refs[0]] if self._refs else []
            if first_of_checkpoint is not None:
                deps.append(first_of_checkpoint)
            if sl.content_hash in self._first_slice:
                deps.append(self._first_slice[sl.content_hash])
            payload = _payload(job)
            unique = list(dict.fromkeys(deps))
            ref = task.remote(
                target, self.rec.store.data_path, blob, payload, self._settings, *unique
            )
            if first_of_checkpoint is None:
                first_of_checkpoint = ref
            self._first_slice.setdefault(sl.content_hash, ref)
            self._refs.append(ref)
            self._jobs.append(job)
            ids.append(ref.hex())
        return ids

    def _gather(self, timeout: float | None) -> bool:
        """Collect what has finished within ``timeout`` seconds; True when all have."""
        ray = _ray()
        pending = [r for i, r in enumerate(self._refs) if i not in self._done]
        if not pending:
            return True
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout)
        index = {ref: i for i, ref in enumerate(self._refs)}
        for ref in ready:
            i = index[ref]
            self._done[i] = _result(ray, ref, self._jobs[i])
        return len(ready) == len(pending)

    def finished(self) -> list[JobResult]:
        if self._refs:
            self._gather(0)
        return [self._done[i] for i in sorted(self._done)]

    def wait(self, timeout: float | None) -> list[JobResult]:
        if not self._gather(timeout):
            raise ExecutorError(
                f"{len(self._refs) - len(self._done)} of {len(self._refs)} Ray job(s) still "
                f"running after {timeout} s; they go on (call wait() again)."
            )
        return [self._done[i] for i in range(len(self._refs))]

    def close(self) -> None:
        try:
            if self._refs:
                self.wait(None)
        finally:
            if self._started:
                _ray().shutdown()
                self._started = False
                self._task = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
