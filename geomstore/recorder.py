"""Recording a training run's geometry from inside the training loop."""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from geomstore._aliases import renamed_kwargs
from geomstore.engine.cache import state_sha256
from geomstore.engine.partition import partition
from geomstore.errors import CheckpointConflictError, GeomstoreError
from geomstore.jobs import submit
from geomstore.loading import ModelSpec, load_model
from geomstore.slice import Slice
from geomstore.store.store import Store

__all__ = ["Recorder"]

if TYPE_CHECKING:
    from geomstore.distributed import _RayRecorder


class Recorder:
    """Compute (or hand off) the partitions of a model's current weights every ``every`` steps.

    Call it from the training loop with the model, the step and any metrics. The
    ``executor`` says where the partitions are computed:

    - ``"local"`` (the default): on each slice now, written to the store before returning.
    - ``"queue"`` (or ``queue=True``): the weights are saved as a ``torch.export`` program
      (``.pt2``, with a JSON of step and metrics) under ``folder`` and jobs are submitted to
      the store's queue, so that ``geomstore worker`` processes (on a GPU machine, say)
      compute them while training goes on.
    - ``"ray"``: the ``.pt2`` program's bytes go to a Ray cluster (``address``, else
      ``$RAY_ADDRESS``, the cluster ``ray start`` left here, or a new local one) as one
      task per slice, and the call returns at once; tasks write into the store exactly
      once (see :mod:`geomstore.distributed`), so
      the store must be reachable from the workers (a ``postgres:`` catalog with an S3
      data path, or a directory on a shared file system). :meth:`wait` (or leaving a
      ``with`` block) gathers each job's result; one job's error does not stop the others.
      With ``folder`` the programs are kept there, else they live in a temporary folder.

    The model's training mode is restored afterwards.

    Checkpoints are named ``step-N``. Recording a new run under a model name that holds an
    earlier run's checkpoints fails with :class:`~geomstore.errors.CheckpointConflictError`
    at the first step whose weights differ, unless ``replace=True`` (the new run's
    checkpoints then replace the old ones of the same step); or give each run its own name.

    ``model`` is the model's name in the store (as everywhere in the query API); the module
    itself is passed to each call as ``net``. The old spellings ``model_name=`` (here) and
    ``model=`` (for the module, in the call) still work, with a DeprecationWarning.

    Examples
    --------
    >>> import tempfile, torch, geomstore
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> store = geomstore.open(tempfile.mkdtemp())
    >>> rec = geomstore.Recorder(store, "toy", [geomstore.Slice.box((-1, -1), (1, 1))], every=10)
    >>> for step in range(30):
    ...     ids = rec(net, step, metrics={"loss": 1.0 / (step + 1)})
    >>> store.sql("SELECT count(*) AS n FROM gs_partitions").table.column("n")[0].as_py()
    3
    >>> store.close()

    On a Ray cluster (``pip install geomstore[ray]``), training goes on while it computes:

    >>> # with geomstore.Recorder(store, "resnet", slices, every=500, executor="ray") as rec:
    >>> #     for step in range(steps):
    >>> #         ...
    >>> #         rec(net, step, metrics={"loss": loss})
    >>> # rec.results  # one JobResult per checkpoint x slice (partition id or error)
    """

    @renamed_kwargs(model_name="model")
    def __init__(
        self,
        store: Store,
        model: str,
        slices: Slice | Sequence[Slice],
        *,
        every: int = 1,
        queue: bool = False,
        folder: str | Path | None = None,
        device: str = "auto",
        verify: bool = False,
        options: dict[str, Any] | None = None,
        executor: str = "local",
        address: str | None = None,
        max_retries: int = 3,
        replace: bool = False,
    ) -> None:
        if executor not in ("local", "queue", "ray"):
            raise GeomstoreError(
                f"executor={executor!r} is not one of 'local', 'queue', 'ray'; pick one."
            )
        if queue and executor == "ray":
            raise GeomstoreError("queue=True and executor='ray' exclude each other; pick one.")
        queue = queue or executor == "queue"
        if every < 1:
            raise GeomstoreError(f"every must be a positive number of steps; got {every}.")
        self.slices = [slices] if isinstance(slices, Slice) else list(slices)
        if not self.slices:
            raise GeomstoreError("give at least one slice to record on.")
        if not isinstance(model, str) or not model:
            raise GeomstoreError(
                f"model is the model's name in the store (a non-empty string), got {model!r}."
            )
        self.store, self.model, self.every = store, model, every
        self.queue, self.device, self.verify = queue, device, verify
        self.executor = "queue" if queue else executor
        self.options = dict(options or {})
        self.replace = replace
        self._ray: _RayRecorder | None = None
        if self.executor == "ray":
            from geomstore.distributed import _RayRecorder

            self._ray = _RayRecorder(self, address=address, max_retries=max_retries)
        if queue and folder is None:
            if store.kind != "ducklake":
                raise GeomstoreError(
                    "queue=True needs folder= (where the exported checkpoints go) for this store."
                )
            folder = Path(store.target) / "checkpoints" / model
        self.folder = Path(folder) if folder is not None else None

    @property
    def model_name(self) -> str:
        """Deprecated spelling of :attr:`model` (the model's name in the store)."""
        return self.model

    @renamed_kwargs(model="net")
    def __call__(
        self,
        net: torch.nn.Module,
        step: int,
        metrics: dict[str, float] | None = None,
        *,
        force: bool = False,
    ) -> list[str]:
        """Record at this step if it is a multiple of ``every`` (or ``force``).

        Returns the partition ids written (the job ids queued; with ``executor="ray"`` the
        Ray task ids, whose results :meth:`wait` gathers); empty when skipped.
        """
        given = step
        try:
            step = operator.index(step)  # ints, numpy and 0-d torch integers; not 1.5
        except TypeError:
            step = -1
        if step < 0 or isinstance(given, bool):
            raise GeomstoreError(
                f"step must be a whole number >= 0 (the training step); got {given!r}."
            )
        if not force and step % self.every:
            return []
        clean = {k: float(v) for k, v in (metrics or {}).items()}
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                if self._ray is not None:
                    path = self._export(net, step, clean, self._ray.folder())
                    return self._ray.submit(path, step, clean)
                return self._queue(net, step, clean) if self.queue else self._now(net, step, clean)
        finally:
            net.train(was_training)

    @property
    def results(self) -> list[Any]:
        """With ``executor="ray"``: the :class:`~geomstore.jobs.JobResult` of each job
        finished so far, in the order recorded (``wait`` gathers the rest)."""
        return [] if self._ray is None else self._ray.finished()

    def wait(self, timeout: float | None = None) -> list[Any]:
        """Block until every job handed to Ray has finished; their JobResults in order.

        Raises :class:`~geomstore.errors.ExecutorError` when ``timeout`` seconds pass
        first (the jobs go on). Without Ray there is nothing to wait for: ``[]``.
        """
        return [] if self._ray is None else self._ray.wait(timeout)

    def close(self) -> None:
        """Wait for the Ray jobs, then leave the cluster if this recorder started it."""
        if self._ray is not None:
            self._ray.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _now(self, net: torch.nn.Module, step: int, metrics: dict[str, float]) -> list[str]:
        ids = []
        for sl in self.slices:
            part = partition(net, sl, device=self.device, **self.options)
            verified = part.verify(net).ok if self.verify else None
            ids.append(
                self.store.add(
                    part,
                    model=self.model,
                    checkpoint=f"step-{step}",
                    step=step,
                    metrics=metrics,
                    verified=verified,
                    replace=self.replace,
                )
            )
        return ids

    def _export(
        self,
        net: torch.nn.Module,
        step: int,
        metrics: dict[str, float],
        folder: Path,
        *,
        check: bool = False,
    ) -> Path:
        """Save ``net`` as a ``torch.export`` program ``folder/step-N.pt2`` (and its JSON).

        With ``check`` (the queue, whose jobs name the file): a checkpoint of this name
        with other weights, stored or queued as a file of an earlier run, is refused
        before anything is written (unless ``replace``); an earlier file with the same
        weights is kept as it is, so that its queued jobs still find what they queued.
        """
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step}.pt2"
        program = self._program(net, step)
        if check:
            sha = state_sha256(program.module().state_dict())
            old = _file_weights(path) if path.is_file() else None
            if not self.replace:
                self._refuse_other_weights(path, step, sha, old)
            if old == sha:
                return path
        torch.export.save(program, str(path))
        path.with_suffix(".json").write_text(json.dumps({"step": step, "metrics": metrics}))
        return path

    def _refuse_other_weights(self, path: Path, step: int, sha: str, old: str | None) -> None:
        name = f"step-{step}"
        stored = (
            self.store.sql(
                "SELECT DISTINCT c.sha256 FROM checkpoints c JOIN models m USING (model_id) "
                "WHERE m.name = $m AND c.name = $c",
                {"m": self.model, "c": name},
            )
            .table.column(0)
            .to_pylist()
        )
        other = [s for s in stored if s != sha]
        if not other and old not in (sha, None):  # a file that does not load is no checkpoint
            other = [old]
        if other:
            raise CheckpointConflictError(
                f"checkpoint {name!r} of model {self.model!r} is "
                f"{'stored' if stored else f'queued as {path}'} already with other weights "
                f"(weights sha256 {str(other[0])[:12]}, these {sha[:12]}); nothing was "
                "written. Pass replace=True to replace it, or record this run under another "
                "model name."
            )

    def _program(self, net: torch.nn.Module, step: int) -> Any:
        param = next(iter(net.parameters()), None)
        dtype = param.dtype if param is not None else torch.float32
        sl = self.slices[0]
        # one example input, batch of 1, however lift shapes a single point
        x = torch.as_tensor(sl.lift([[0.0, 0.0]]), dtype=dtype).reshape(1, *sl.input_shape)
        try:
            return torch.export.export(net, (x,))
        except Exception as exc:
            raise GeomstoreError(
                f"cannot export the model at step {step} with torch.export ({exc}); "
                "record with executor='local' instead."
            ) from None

    def _queue(self, net: torch.nn.Module, step: int, metrics: dict[str, float]) -> list[str]:
        assert self.folder is not None
        path = self._export(net, step, metrics, self.folder, check=True)
        return [
            submit(
                self.store,
                ModelSpec(str(path)),
                sl,
                model=self.model,
                checkpoint=f"step-{step}",
                step=step,
                metrics=metrics,
                verify=self.verify,
                options=self.options,
                replace=self.replace,
            )
            for sl in self.slices
        ]


def _file_weights(path: Path) -> str | None:
    """The weights hash of an exported checkpoint file (None: it does not load)."""
    try:
        program = load_model(path)
    except GeomstoreError:
        return None
    return state_sha256(program.module().state_dict())
