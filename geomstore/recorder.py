"""Recording a training run's geometry from inside the training loop."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from geomstore._aliases import renamed_kwargs
from geomstore.engine.partition import partition
from geomstore.errors import GeomstoreError
from geomstore.jobs import submit
from geomstore.loading import ModelSpec
from geomstore.slice import Slice
from geomstore.store.store import Store

__all__ = ["Recorder"]


class Recorder:
    """Compute (or queue) the partitions of a model's current weights every ``every`` steps.

    Call it from the training loop with the model, the step and any metrics. Directly
    (the default) it partitions the weights on each slice and writes them to the store
    before returning; with ``queue=True`` it saves the weights as a ``torch.export``
    program (``.pt2``, with a JSON of step and metrics) under ``folder`` and submits jobs,
    so that ``geomstore worker`` processes (on a GPU machine, say) compute them while
    training goes on. The model's training mode is restored afterwards.

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
    ) -> None:
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
        self.options = dict(options or {})
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

        Returns the partition ids written (or the job ids queued); empty when skipped.
        """
        if not force and step % self.every:
            return []
        clean = {k: float(v) for k, v in (metrics or {}).items()}
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                return self._queue(net, step, clean) if self.queue else self._now(net, step, clean)
        finally:
            net.train(was_training)

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
                )
            )
        return ids

    def _queue(self, net: torch.nn.Module, step: int, metrics: dict[str, float]) -> list[str]:
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step}.pt2"
        param = next(iter(net.parameters()), None)
        dtype = param.dtype if param is not None else torch.float32
        sl = self.slices[0]
        # one example input, batch of 1, however lift shapes a single point
        x = torch.as_tensor(sl.lift([[0.0, 0.0]]), dtype=dtype).reshape(1, *sl.input_shape)
        try:
            program = torch.export.export(net, (x,))
        except Exception as exc:
            raise GeomstoreError(
                f"cannot export the model at step {step} with torch.export ({exc}); "
                "record with queue=False instead."
            ) from None
        torch.export.save(program, str(path))
        path.with_suffix(".json").write_text(json.dumps({"step": step, "metrics": metrics}))
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
            )
            for sl in self.slices
        ]
