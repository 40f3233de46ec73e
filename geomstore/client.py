"""A Python client of ``geomstore serve``: the read methods of a local store, over HTTP.

``geomstore.connect(url, token=...)`` gives a :class:`Client` whose methods answer what
the local store and :mod:`geomstore.queries` answer (same tables, same columns, same
float64 values), moved as Arrow IPC. Errors come back typed: an unknown model raises
:class:`~geomstore.errors.NotFoundError`, a refused statement
:class:`~geomstore.errors.SQLRefusedError`, and so on.
"""

from __future__ import annotations

import base64
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
import pyarrow as pa

from geomstore import errors
from geomstore.engine.partition import Partition
from geomstore.errors import GeomstoreError, StoreError
from geomstore.slice import Slice
from geomstore.store.store import QueryResult
from geomstore.store.unavailable import io_errors

__all__ = ["Client", "RemoteError", "connect", "remote_aware"]

ARROW = "application/vnd.apache.arrow.stream"
_RETRY_STATUS = (502, 503, 504)
#: Default retries: waits of 0.2, 0.4, 0.8, 1.6 and then 2 s (``MAX_BACKOFF``), 15 s in
#: all, longer than ``geomstore serve`` takes to start again.
RETRIES = 10
MAX_BACKOFF = 2.0
#: The columns ``point_regions(..., affine=True)`` adds to the plain answer.
_AFFINE = ("partition_id", "A", "c", "pattern_hash")


class RemoteError(StoreError):
    """The server answered an error that has no typed counterpart here (``status`` set)."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _typed(status: int, body: dict[str, Any]) -> GeomstoreError:
    """The error the server described, as the same geomstore error class where known."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    kind, message = str(err.get("type", "")), str(err.get("message", "server error"))
    cls = getattr(errors, kind, None)
    if kind == "NotFoundError":
        return errors.NotFoundError(message, kind=err.get("kind", ""), name=err.get("name", ""))
    if kind == "SQLRefusedError":
        return errors.SQLRefusedError(message, reason=err.get("reason", "refused"))
    if kind == "QueryTimeoutError":
        return errors.QueryTimeoutError(message, timeout=float(err.get("timeout", 0.0)))
    if isinstance(cls, type) and issubclass(cls, GeomstoreError):
        try:
            return cls(message)
        except TypeError:
            pass
    return RemoteError(f"{message} (HTTP {status})", status=status)


def _strip(table: pa.Table) -> pa.Table:
    meta = {
        k: v for k, v in (table.schema.metadata or {}).items() if not k.startswith(b"geomstore.")
    }
    return table.replace_schema_metadata(meta or None)


class _Rows:
    """The answer of one statement run remotely, read like a DuckDB result."""

    def __init__(self, table: pa.Table) -> None:
        self._table = table

    def to_arrow_table(self) -> pa.Table:
        return self._table

    fetch_arrow_table = to_arrow_table

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(r.values()) for r in self._table.to_pylist()]

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self.fetchall()
        return rows[0] if rows else None


class RemoteReader:
    """The read connection of a served store: every statement runs in the service's SQL
    sandbox, so catalog listings and SQL-only queries work on a :class:`Client` as on a
    local store."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def execute(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> _Rows:
        """Run one SELECT remotely; a cut answer is an error, never silently short."""
        res = self._client.sql(query, params, max_rows=10_000_000)
        if res.truncated:
            raise StoreError(
                "the served answer was cut at the server's --max-rows; ask for less, or run "
                "this on the store's own machine."
            )
        return _Rows(res.table)

    def register(self, name: str, table: object) -> None:
        raise StoreError(
            "this query joins local tables and runs on the server only; call it through "
            "the client's method of the same name (client.local_complexity(...), ...)."
        )


class Client:
    """A connection to a geomstore service; use :func:`geomstore.connect`.

    Parameters
    ----------
    url : str
        ``http://host:port`` of ``geomstore serve``.
    token : str, optional
        A bearer token from the server's ``--token-file``.
    timeout : float
        Seconds to wait for each answer.
    retries : int
        Times to retry a request that could not reach the server (connection refused or
        dropped, 502/503/504), waiting ``min(backoff * 2**i, max_backoff)`` seconds
        between tries: by default 15 s in all, so that a request outlasts a server restart;
        every request here is a read (or an idempotent job submission), so retrying is safe.
    backoff, max_backoff : float
        The first wait and the longest one, in seconds.

    Examples
    --------
    >>> import geomstore
    >>> client = geomstore.connect("http://127.0.0.1:8765")  # doctest: +SKIP
    >>> client.partitions(model="moons-mlp")  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = RETRIES,
        backoff: float = 0.2,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise GeomstoreError(
                f"the service URL must start with http:// or https://; got {url!r}."
            )
        self.url = url.rstrip("/")
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.max_backoff = max_backoff
        headers = {"Accept": ARROW, "User-Agent": "geomstore-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    # plumbing ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        last: Exception | None = None
        t0 = time.monotonic()
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                resp = self._http.request(method, path, **kw)
            except httpx.TransportError as exc:
                last = exc
                continue
            if resp.status_code in _RETRY_STATUS and attempt < self.retries:
                last = RemoteError(f"HTTP {resp.status_code}", status=resp.status_code)
                continue
            if resp.status_code >= 400:
                try:
                    body = resp.json()
                except (json.JSONDecodeError, UnicodeDecodeError):
                    body = {"error": {"message": resp.text[:200]}}
                raise _typed(resp.status_code, body)
            return resp
        raise StoreError(
            f"cannot reach the geomstore service at {self.url} after {self.retries + 1} tries "
            f"in {time.monotonic() - t0:.1f} s ({type(last).__name__}: {last}); is "
            "`geomstore serve` running, and is the URL right? (connect(url, retries=N) waits "
            "longer)"
        ) from last

    def _table(self, method: str, path: str, **kw: Any) -> tuple[pa.Table, dict[str, Any]]:
        resp = self._request(method, path, **kw)
        table = pa.ipc.open_stream(resp.content).read_all()
        meta = {
            k.decode()[len("geomstore.") :]: json.loads(v)
            for k, v in (table.schema.metadata or {}).items()
            if k.startswith(b"geomstore.")
        }
        return _strip(table), meta

    @staticmethod
    def _selection(
        model: str, slice: str | None, checkpoints: Sequence[str] | None
    ) -> dict[str, Any]:
        return {
            "model": model,
            "slice": slice,
            "checkpoints": list(checkpoints) if checkpoints is not None else None,
        }

    @staticmethod
    def _points(points: np.ndarray | str | Sequence[Sequence[float]]) -> dict[str, Any]:
        if isinstance(points, str):
            return {"dataset": points}
        u = np.asarray(points, dtype=np.float64)
        if u.ndim != 2 or u.shape[1] != 2 or not np.all(np.isfinite(u)):
            raise GeomstoreError(
                "points must be finite slice coordinates of shape (n, 2), or a stored data "
                "set name; project inputs with slice.project(x)."
            )
        return {"points": u.tolist()}  # repr of a float64 round-trips exactly through JSON

    def reader(self) -> RemoteReader:
        """Statements through the service's SQL sandbox (what query functions read with)."""
        return RemoteReader(self)

    read_only = True

    def catalog_version(self) -> None:
        """None: a client reads the served catalog afresh each time (see Store's)."""
        return None

    def _memo(self, key: str, build: Callable[[], Any]) -> Any:
        return build()

    # catalog -----------------------------------------------------------------------------------
    def healthz(self) -> dict[str, Any]:
        """The server's health answer (``{"status": "ok", ...}``)."""
        out: dict[str, Any] = self._request("GET", "/healthz").json()
        return out

    def models(self) -> pa.Table:
        """The models in the store (see :func:`geomstore.queries.catalog.models`)."""
        return self._table("GET", "/api/models")[0]

    def checkpoints(self, *, model: str | None = None) -> pa.Table:
        """Checkpoints of one model or all (see :func:`geomstore.queries.catalog.checkpoints`)."""
        params = {"model": model} if model is not None else {}
        return self._table("GET", "/api/checkpoints", params=params)[0]

    def slices(self) -> pa.Table:
        """The store's slices (see :func:`geomstore.queries.catalog.slices`)."""
        return self._table("GET", "/api/slices")[0]

    def datasets(self, *, slice: str | None = None) -> pa.Table:
        """Data sets projected onto slices."""
        params = {"slice": slice} if slice is not None else {}
        return self._table("GET", "/api/datasets", params=params)[0]

    def partitions(
        self,
        *,
        model: str | None = None,
        slice: str | None = None,
        checkpoints: Sequence[str] | None = None,
    ) -> pa.Table:
        """One row per stored partition, like :meth:`geomstore.Store.partitions`."""
        params: dict[str, Any] = {}
        if model is not None:
            params["model"] = model
        if slice is not None:
            params["slice"] = slice
        if checkpoints is not None:
            params["checkpoint"] = list(checkpoints)
        return self._table("GET", "/api/partitions", params=params)[0]

    def load_slice(self, name: str) -> Slice:
        """A stored slice by name or id, like :meth:`geomstore.Store.load_slice`."""
        from geomstore.store.load import _slice_from_row

        rows = [r for r in self.slices().to_pylist() if name in (r["slice"], r["slice_id"])]
        if not rows:
            raise errors.NotFoundError(
                f"no slice named {name!r} in the served store.", kind="slice", name=name
            )
        if len({r["slice_id"] for r in rows}) > 1:
            raise StoreError(f"several slices are named {name!r}; give the slice id instead.")
        r = rows[0]
        return _slice_from_row(r["slice"], r["input_shape"], r["origin"], r["basis"], r["domain"])

    # SQL and partitions ------------------------------------------------------------------------
    def sql(
        self,
        query: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
        *,
        max_rows: int = 100_000,
        timeout: float | None = None,
    ) -> QueryResult:
        """One read-only SELECT in the server's SQL sandbox, like :meth:`geomstore.Store.sql`."""
        body: dict[str, Any] = {"sql": query, "params": params, "max_rows": max_rows}
        if timeout is not None:
            body["timeout"] = timeout
        table, meta = self._table("POST", "/api/sql", json=body)
        return QueryResult(table, bool(meta.get("truncated", False)))

    def partition_table(
        self,
        partition_id: str,
        table: str = "regions",
        *,
        bbox: Sequence[float] | None = None,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        """Rows of one partition's regions, edges or boundary (geometry as WKB)."""
        params: dict[str, Any] = {}
        if bbox is not None:
            params["bbox"] = ",".join(repr(float(v)) for v in bbox)
        if columns is not None:
            params["columns"] = ",".join(columns)
        return self._table("GET", f"/api/partitions/{partition_id}/{table}", params=params)[0]

    def load_partition(self, partition_id: str) -> Partition:
        """A stored partition, exactly as :meth:`geomstore.Store.load_partition` rebuilds it."""
        meta = self._request("GET", f"/api/partitions/{partition_id}").json()

        def part(name: str) -> pa.Table:
            return self._table("GET", f"/api/partitions/{partition_id}/load/{name}")[0]

        states = part("states").column("states").combine_chunks()
        width = states.type.list_size
        flat = states.flatten().to_numpy(zero_copy_only=False)
        return Partition(
            regions=part("regions"),
            edges=part("edges"),
            boundary=part("boundary"),
            slice=Slice.from_dict(meta["slice"]),
            model_summary=meta["model_summary"],
            settings=meta["settings"],
            seconds=float(meta["seconds"]),
            states=np.asarray(flat, dtype=np.uint8).reshape(len(states), width),
        )

    # queries (the same keyword-only arguments as geomstore.queries) ----------------------------
    def local_complexity(
        self,
        *,
        model: str,
        points: np.ndarray | str,
        radius: float,
        slice: str | None = None,
        checkpoints: Sequence[str] | None = None,
        shape: str = "disk",
        layers: str = "hidden",
    ) -> pa.Table:
        """Local complexity at points (see :func:`geomstore.queries.local_complexity`)."""
        body = self._selection(model, slice, checkpoints) | self._points(points)
        body |= {"radius": radius, "shape": shape, "layers": layers}
        return self._table("POST", "/api/lc", json=body)[0]

    def lc_trajectory(
        self,
        *,
        model: str,
        points: np.ndarray | str,
        radius: float,
        slice: str | None = None,
        checkpoints: Sequence[str] | None = None,
        shape: str = "disk",
        layers: str = "hidden",
    ) -> tuple[pa.Table, dict[str, dict[str, int | None]]]:
        """LC over training and its turning points (see :func:`geomstore.queries.lc_trajectory`)."""
        body = self._selection(model, slice, checkpoints) | self._points(points)
        body |= {"radius": radius, "shape": shape, "layers": layers}
        table, meta = self._table("POST", "/api/lc/trajectory", json=body)
        return table, meta.get("turning_points", {})

    def partition_stats(
        self,
        *,
        model: str,
        slice: str | None = None,
        checkpoints: Sequence[str] | None = None,
    ) -> pa.Table:
        """Partition statistics per checkpoint (see :func:`geomstore.queries.partition_stats`)."""
        params: dict[str, Any] = {"model": model}
        if slice is not None:
            params["slice"] = slice
        if checkpoints is not None:
            params["checkpoint"] = list(checkpoints)
        return self._table("GET", "/api/stats", params=params)[0]

    def boundary_samples(
        self,
        *,
        model: str,
        n: int,
        slice: str | None = None,
        checkpoints: Sequence[str] | None = None,
        seed: int = 0,
        pair: tuple[int, int] | None = None,
        near: np.ndarray | None = None,
        within: float | None = None,
        offset: float = 0.0,
    ) -> pa.Table:
        """Decision-boundary samples (see :func:`geomstore.queries.boundary_samples`)."""
        body = self._selection(model, slice, checkpoints) | {
            "n": n,
            "seed": seed,
            "pair": list(pair) if pair is not None else None,
            "near": np.asarray(near, dtype=np.float64).reshape(-1, 2).tolist()
            if near is not None
            else None,
            "within": within,
            "offset": offset,
        }
        return self._table("POST", "/api/boundary/samples", json=body)[0]

    def point_regions(
        self,
        *,
        model: str,
        points: np.ndarray | str,
        slice: str | None = None,
        checkpoints: Sequence[str] | None = None,
        affine: bool = False,
    ) -> pa.Table:
        """The region holding each point (see :func:`geomstore.queries.point_regions`): the
        same columns, with ``affine=True`` also the partition id, the affine map ``A``, ``c``
        and the pattern hash."""
        body = self._selection(model, slice, checkpoints) | self._points(points)
        table = self._table("POST", "/api/points/regions", json=body)[0]
        # the service always answers with the affine columns, the partition id first
        plain = [c for c in table.column_names if c not in _AFFINE]
        return table.select(plain + list(_AFFINE) if affine else plain)

    def churn(
        self,
        *,
        model: str,
        points: np.ndarray | str,
        slice: str | None = None,
        checkpoints: Sequence[str] | None = None,
    ) -> pa.Table:
        """Pattern and label churn between checkpoints (see :func:`geomstore.queries.churn`)."""
        body = self._selection(model, slice, checkpoints) | self._points(points)
        return self._table("POST", "/api/compare/churn", json=body)[0]

    def agreement_over(
        self,
        *,
        model: str,
        slice: str | None = None,
        checkpoints: Sequence[str] | None = None,
        spacing: float | None = None,
    ) -> pa.Table:
        """Agreement and boundary movement of consecutive checkpoints
        (see :func:`geomstore.queries.agreement_over`)."""
        body = self._selection(model, slice, checkpoints) | {"spacing": spacing}
        return self._table("POST", "/api/compare", json=body)[0]

    # writing -----------------------------------------------------------------------------------
    def submit(
        self,
        path: str | Path,
        slice: Slice,
        *,
        model: str,
        checkpoint: str | None = None,
        step: int | None = None,
        metrics: dict[str, float] | None = None,
        options: dict[str, Any] | None = None,
        verify: bool = False,
    ) -> str:
        """Queue a checkpoint file (``.pt2`` export or TorchScript) for the server's workers.

        Needs a read-write token. Returns the job id (the same file, slice and options give
        the same job).
        """
        p = Path(path)
        body = {
            "model": model,
            "slice": slice.to_dict(),
            "file": base64.b64encode(p.read_bytes()).decode(),
            "filename": p.name,
            "checkpoint": checkpoint,
            "step": step,
            "metrics": metrics,
            "options": options,
            "verify": verify,
        }
        job: str = self._request("POST", "/api/jobs", json=body).json()["job_id"]
        return job

    def jobs(self, *, status: str | None = None, model: str | None = None) -> pa.Table:
        """The server's job queue (``GET /api/jobs``), as :func:`geomstore.jobs.job_table`."""
        params = {k: v for k, v in (("status", status), ("model", model)) if v is not None}
        return self._table("GET", "/api/jobs", params=params)[0]

    def job(self, job_id: str) -> dict[str, Any]:
        """One job's row (status, attempts, error, partition id) as a dict."""
        row: dict[str, Any] = self._request("GET", f"/api/jobs/{quote(job_id, safe='')}").json()
        return row


F = TypeVar("F", bound=Callable[..., Any])


def remote_aware(fn: F) -> F:
    """Let a query function take a :class:`Client` as its store: the call then goes to the
    service's endpoint (the client's method of the same name) and returns the same table.

    On a local store, data the store cannot fetch (its S3 endpoint down) raises a
    :class:`~geomstore.errors.StoreError` naming the data path, not DuckDB's IOException.

    Examples
    --------
    >>> from geomstore.queries import partition_stats
    >>> partition_stats.__wrapped__.__name__
    'partition_stats'
    """

    @functools.wraps(fn)
    def call(store: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(store, Client):
            return getattr(store, fn.__name__)(*args, **kwargs)
        with io_errors(store):
            return fn(store, *args, **kwargs)

    return call  # type: ignore[return-value]


def connect(
    url: str,
    *,
    token: str | None = None,
    timeout: float = 120.0,
    retries: int = RETRIES,
) -> Client:
    """Connect to a ``geomstore serve`` at ``url``; see :class:`Client`.

    Examples
    --------
    >>> import geomstore
    >>> with geomstore.connect("http://127.0.0.1:8765", token="...") as client:  # doctest: +SKIP
    ...     client.partition_stats(model="moons-mlp")
    """
    return Client(url, token=token, timeout=timeout, retries=retries)
