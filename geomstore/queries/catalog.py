"""What a store holds: models, checkpoints, slices, partitions and data sets, as Arrow tables.

These listings are the public catalog of a store; the CLI (``geomstore partitions``), the
HTTP service and the client call exactly these functions. Unknown names raise
:class:`~geomstore.errors.NotFoundError` (``kind`` and ``name`` say what was missing), so
a service can answer 404.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geomstore.errors import NotFoundError
from geomstore.store.unavailable import io_errors

if TYPE_CHECKING:
    from geomstore.store.store import Store

__all__ = [
    "checkpoints",
    "dataset_points",
    "datasets",
    "missing_dataset",
    "models",
    "partitions",
    "slices",
]


def _rows(store: Store, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
    # data the store cannot fetch (S3 down) is a StoreError naming the data path
    with io_errors(store):
        return store.reader().execute(sql, params).to_arrow_table()


def _fetch(store: Store, sql: str, params: Sequence[Any] | None = None) -> list[Any]:
    with io_errors(store):
        return store.reader().execute(sql, params).fetchall()


def _known(store: Store, sql: str) -> list[str]:
    return [r[0] for r in _fetch(store, sql)]


def _model_names(store: Store) -> list[str]:
    return store._memo(
        "model names", lambda: _known(store, "SELECT DISTINCT name FROM models ORDER BY name")
    )


def _require_model(store: Store, model: str) -> None:
    names = _model_names(store)
    if model not in names:
        raise NotFoundError(
            f"no model {model!r} in this store; models: {names or 'none yet'} "
            "(list them with geomstore.queries.models(store) or geomstore partitions STORE).",
            kind="model",
            name=model,
        )


def _require_slice(store: Store, slice: str) -> None:
    rows = store._memo(
        "slice names",
        lambda: _fetch(store, "SELECT name, slice_id FROM slices ORDER BY name"),
    )
    if not any(slice in (name, sid) for name, sid in rows):
        names = sorted({r[0] for r in rows})
        raise NotFoundError(
            f"no slice {slice!r} in this store; slices: {names or 'none yet'} "
            "(a slice is given by name or slice id).",
            kind="slice",
            name=slice,
        )


def choices(names: Sequence[str], most: int = 12) -> str:
    """Names for an error message: all of them, or the first ``most`` and how many more.

    >>> choices(["a", "b"]), choices([]), choices(list("abcd"), most=2)
    ('a, b', 'none yet', 'a, b, ... (4 in all)')
    """
    if not names:
        return "none yet"
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown}, ... ({len(names)} in all)"


def models(store: Store) -> pa.Table:
    """The models in a store, one row per model (name and architecture).

    Columns: model (name), model_id, n_checkpoints, n_partitions, input_shape (JSON),
    n_outputs, n_units, units_per_layer (JSON), created_at; ordered by name.

    Examples
    --------
    >>> import tempfile, geomstore
    >>> from geomstore.queries import models
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     models(store).column_names[:3]
    ['model', 'model_id', 'n_checkpoints']
    """
    return store._memo("models", lambda: _rows(store, _MODELS))


_MODELS = (
    "SELECT m.name AS model, m.model_id, "
    "(SELECT count(*) FROM checkpoints c WHERE c.model_id = m.model_id) AS n_checkpoints, "
    "(SELECT count(*) FROM partitions p JOIN checkpoints c USING (checkpoint_id) "
    " WHERE c.model_id = m.model_id) AS n_partitions, "
    "m.input_shape, m.n_outputs, m.n_units, m.units_per_layer, m.created_at "
    "FROM models m ORDER BY m.name, m.created_at"
)


def checkpoints(store: Store, *, model: str | None = None) -> pa.Table:
    """The checkpoints of one model (or of all), ordered by model and step.

    Columns: model, checkpoint (name), step, checkpoint_id, model_id, sha256, source,
    metrics (JSON), n_partitions, created_at. An unknown ``model`` raises
    :class:`~geomstore.errors.NotFoundError`.

    Examples
    --------
    >>> import tempfile, geomstore
    >>> from geomstore.queries import checkpoints
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     checkpoints(store).num_rows
    0
    """
    sql = (
        "SELECT m.name AS model, c.name AS checkpoint, c.step, c.checkpoint_id, c.model_id, "
        "c.sha256, c.source, c.metrics, "
        "(SELECT count(*) FROM partitions p WHERE p.checkpoint_id = c.checkpoint_id) "
        "AS n_partitions, c.created_at "
        "FROM checkpoints c JOIN models m USING (model_id)"
    )
    params: list[Any] = []
    if model is not None:
        _require_model(store, model)
        sql += " WHERE m.name = ?"
        params.append(model)
    sql += " ORDER BY m.name, c.step NULLS LAST, c.name"
    return _rows(store, sql, params)


def slices(store: Store) -> pa.Table:
    """The slices in a store: name, id, input shape, plane and domain.

    Columns: slice (name), slice_id, dim, input_shape (JSON), origin, basis (row-major,
    2 x dim), domain (WKT polygon in slice coordinates), n_partitions, created_at.

    Examples
    --------
    >>> import tempfile, geomstore
    >>> from geomstore.queries import slices
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     "domain" in slices(store).column_names
    True
    """
    return store._memo("slices", lambda: _rows(store, _SLICES))


_SLICES = (
    "SELECT s.name AS slice, s.slice_id, s.dim, s.input_shape, s.origin, s.basis, "
    "ST_AsText(s.domain) AS domain, "
    "(SELECT count(*) FROM partitions p WHERE p.slice_id = s.slice_id) AS n_partitions, "
    "s.created_at FROM slices s ORDER BY s.name, s.created_at"
)


def partitions(
    store: Store,
    *,
    model: str | None = None,
    slice: str | None = None,
    checkpoints: Sequence[str] | None = None,
) -> pa.Table:
    """One row per stored partition, optionally of one model, slice and some checkpoints.

    Parameters
    ----------
    store : Store
    model : str, optional
        A model's name.
    slice : str, optional
        A slice's name or id.
    checkpoints : sequence of str, optional
        Checkpoint names; each must exist (of ``model`` when given).

    Returns
    -------
    pyarrow.Table
        Columns: partition_id, model, checkpoint, step, slice (name), slice_id, n_regions,
        n_edges, n_boundary, engine_version, device, seconds, verified, checkpoint_id,
        model_id, metrics (JSON), created_at; ordered by model, slice, step.

    Raises
    ------
    NotFoundError
        An unknown model, slice or checkpoint (``kind`` names which).

    Examples
    --------
    >>> import tempfile, torch, geomstore
    >>> from geomstore.queries import partitions
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> part = geomstore.partition(net, geomstore.Slice.box((-1, -1), (1, 1)), device="cpu")
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     _ = store.add(part, model="toy", checkpoint="init", step=0)
    ...     partitions(store, model="toy").select(["model", "checkpoint", "step"]).to_pylist()
    [{'model': 'toy', 'checkpoint': 'init', 'step': 0}]
    """
    table = store._memo("partitions", lambda: _rows(store, _PARTITIONS))
    keep = None
    if model is not None:
        _require_model(store, model)
        keep = pc.equal(table.column("model"), model)
    if slice is not None:
        _require_slice(store, slice)
        on = pc.or_(
            pc.equal(table.column("slice"), slice), pc.equal(table.column("slice_id"), slice)
        )
        keep = on if keep is None else pc.and_(keep, on)
    if checkpoints is not None:
        wanted = [str(c) for c in checkpoints]
        known = set(_checkpoint_names(store, model))
        missing = [c for c in wanted if c not in known]
        if missing:
            of = f" of model {model!r}" if model is not None else ""
            raise NotFoundError(
                f"no checkpoint {missing[0]!r}{of} in this store; checkpoints: "
                f"{choices(sorted(known))} (list them with geomstore.queries.checkpoints("
                "store, model=...) or geomstore partitions STORE --model NAME).",
                kind="checkpoint",
                name=missing[0],
            )
        on = pc.is_in(table.column("checkpoint"), pa.array(wanted, type=pa.string()))
        keep = on if keep is None else pc.and_(keep, on)
    return table if keep is None else table.filter(keep)


_PARTITIONS = (
    "SELECT p.partition_id, m.name AS model, c.name AS checkpoint, c.step, "
    "s.name AS slice, p.slice_id, p.n_regions, p.n_edges, p.n_boundary, p.engine_version, "
    "p.device, p.seconds, p.verified, p.checkpoint_id, c.model_id, c.metrics, p.created_at "
    "FROM partitions p JOIN checkpoints c USING (checkpoint_id) "
    "JOIN models m ON m.model_id = c.model_id JOIN slices s ON s.slice_id = p.slice_id "
    "ORDER BY m.name, s.name, c.step NULLS LAST, c.name, p.created_at"
)


def _checkpoint_names(store: Store, model: str | None) -> list[str]:
    """The checkpoint names of ``model`` (of every model when None)."""
    pairs = store._memo(
        "checkpoint names",
        lambda: _fetch(
            store,
            "SELECT DISTINCT m.name, c.name FROM checkpoints c JOIN models m USING (model_id)",
        ),
    )
    return [c for m, c in pairs if model is None or m == model]


def datasets(store: Store, *, slice: str | None = None) -> pa.Table:
    """The data sets projected onto slices (``store.add_points``).

    Columns: dataset (name), dataset_id, slice (name), slice_id, n_points, created_at.

    Examples
    --------
    >>> import tempfile, geomstore
    >>> from geomstore.queries import datasets
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     datasets(store).num_rows
    0
    """
    sql = (
        "SELECT d.name AS dataset, d.dataset_id, s.name AS slice, d.slice_id, d.n_points, "
        "d.created_at FROM datasets d LEFT JOIN slices s ON s.slice_id = d.slice_id"
    )
    params: list[Any] = []
    if slice is not None:
        _require_slice(store, slice)
        sql += " WHERE s.name = ? OR d.slice_id = ?"
        params += [slice, slice]
    return _rows(store, sql + " ORDER BY d.name, s.name", params)


def dataset_points(
    store: Store, *, dataset: str, slice: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """The points (slice coordinates, float64) and labels of a stored data set on a slice.

    Returns ``(u, labels)``: ``u`` has shape (n, 2); ``labels`` is None when the data set
    has no labels. An unknown data set raises :class:`~geomstore.errors.NotFoundError`.

    Examples
    --------
    >>> import tempfile, geomstore
    >>> from geomstore.queries import dataset_points
    >>> sl = geomstore.Slice.box((-1, -1), (1, 1), name="plane")
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     _ = store.add_points("pts", sl, [[0.5, 0.25]], labels=[1])
    ...     u, labels = dataset_points(store, dataset="pts", slice=sl.content_hash[:20])
    >>> u.tolist(), labels.tolist()
    ([[0.5, 0.25]], [1])
    """
    rows = _fetch(
        store,
        "SELECT p.u0, p.u1, p.label FROM points p JOIN datasets d USING (dataset_id) "
        "LEFT JOIN slices s ON s.slice_id = d.slice_id "
        "WHERE d.name = ? AND (d.slice_id = ? OR s.name = ?) ORDER BY p.split, p.point_id",
        [dataset, slice, slice],
    )
    if not rows:
        raise missing_dataset(store, dataset, slice)
    u = np.array([[r[0], r[1]] for r in rows], dtype=np.float64)
    labels = [r[2] for r in rows]
    return u, None if any(v is None for v in labels) else np.array(labels, dtype=np.int64)


def missing_dataset(store: Store, dataset: str, slice: str) -> NotFoundError:
    """The error for a data set with no points on ``slice`` (a name or id): it lists the
    data sets stored on that slice, and the slices that hold ``dataset`` if others do."""
    on = datasets(store, slice=slice).to_pylist()  # an unknown slice raises here
    here = sorted({r["dataset"] for r in on})
    named = [r for r in slices(store).to_pylist() if slice in (r["slice"], r["slice_id"])]
    shown = named[0]["slice"] if named and named[0]["slice"] else slice
    others = sorted(
        {
            r["slice"] or r["slice_id"]
            for r in datasets(store).to_pylist()
            if r["dataset"] == dataset
        }
    )
    also = f" (it is on slice(s) {others} only)" if others else ""
    return NotFoundError(
        f"no stored points of data set {dataset!r} on slice {shown!r}{also}; data sets on "
        f"this slice: {here or 'none yet'} (add points with store.add_points(name, slice, x)).",
        kind="dataset",
        name=dataset,
    )
