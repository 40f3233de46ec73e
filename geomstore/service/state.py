"""What a running service holds: its settings, its limits and a pool of read-only stores.

DuckDB connections are not shared between threads: each request borrows one read-only
:class:`~geomstore.Store` from the pool (waiting at most the query timeout for one), so a
slow query holds one store while the others go on. Every query function runs under a
deadline that interrupts the request's read connections.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import duckdb

from geomstore.engine.partition import Partition
from geomstore.errors import GeomstoreError, QueryTimeoutError
from geomstore.service.auth import Tokens
from geomstore.service.metrics import Metrics
from geomstore.store.store import Store

__all__ = [
    "LimitError",
    "Limits",
    "PartitionCache",
    "ServiceConfig",
    "ServiceState",
    "StorePool",
]


class LimitError(GeomstoreError, ValueError):
    """A request asks for more than the server allows (body, rows, points or samples)."""


@dataclass(frozen=True)
class Limits:
    """The most a single request may ask for; each but ``max_boundary_points`` has a
    ``geomstore serve`` option."""

    max_body: int = 8 * 2**20
    """Request body size in bytes."""
    max_rows: int = 100_000
    """Rows of a SQL answer (more rows are cut and reported as truncated)."""
    max_partition_rows: int = 2_000_000
    """Rows of one partition table (regions, edges, boundary)."""
    max_points: int = 10_000
    """Points in one LC / region-at-point / churn request."""
    max_samples: int = 100_000
    """Boundary samples per checkpoint."""
    max_upload: int = 256 * 2**20
    """A checkpoint file submitted as a job, in bytes."""
    max_boundary_points: int = 2_000_000
    """Boundary points sampled by one checkpoint comparison (``spacing``), in all; no
    option of its own: ask for a larger ``spacing`` (about 2 s of NumPy work a million)."""

    def check(self, what: str, n: int, most: int, option: str) -> None:
        """Refuse ``n`` above ``most`` with a message naming the server option."""
        if n > most:
            raise LimitError(
                f"{what}: {n} is more than this server allows ({most}); ask for fewer, "
                f"or start the server with a larger {option}."
            )


@dataclass
class ServiceConfig:
    """How ``geomstore serve`` was started."""

    store: str
    tokens: Tokens | None = None
    cors_origins: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    timeout: float = 30.0
    """Seconds before a query is interrupted."""
    pool_size: int = 4
    """Read-only stores (connections) shared by the request threads."""
    data_path: str | None = None


class StorePool:
    """Read-only stores handed out one request at a time (opened lazily, reused)."""

    def __init__(self, target: str, size: int, *, data_path: str | None = None) -> None:
        if size < 1:
            raise GeomstoreError(f"the pool needs at least one store; got {size}.")
        self.target = target
        self.data_path = data_path
        self.size = size
        self._free: queue.LifoQueue[Store] = queue.LifoQueue()
        self._opened = 0
        self._lock = threading.Lock()
        self._all: list[Store] = []

    def _open(self) -> Store:
        return Store(self.target, read_only=True, data_path=self.data_path)

    @contextlib.contextmanager
    def store(self, wait: float) -> Iterator[Store]:
        """Borrow a store for one request; wait at most ``wait`` seconds for a free one."""
        st: Store | None = None
        with self._lock:
            with contextlib.suppress(queue.Empty):
                st = self._free.get_nowait()
            if st is None and self._opened < self.size:
                self._opened += 1
                opening = True
            else:
                opening = False
        if st is None and opening:
            try:
                st = self._open()
            except BaseException:
                with self._lock:
                    self._opened -= 1
                raise
            with self._lock:
                self._all.append(st)
        if st is None:
            try:
                st = self._free.get(timeout=wait)
            except queue.Empty:
                raise QueryTimeoutError(
                    f"the server is busy: no free store connection within {wait:g} s; "
                    "retry, or start the server with a larger --pool.",
                    timeout=wait,
                ) from None
        broken = False
        try:
            yield st
        except duckdb.ConnectionException:
            broken = True
            raise
        finally:
            if broken:
                self._discard(st)
            else:
                self._free.put(st)

    def warm(self) -> None:
        """Open every store of the pool now (opening costs far more than a query)."""
        with self._lock:
            missing = self.size - self._opened
            self._opened += missing
        for _ in range(missing):
            try:
                st = self._open()
                st.sql("SELECT count(*) FROM partitions")  # the sandbox's first use is slow
            except BaseException:
                with self._lock:
                    self._opened -= 1
                raise
            with self._lock:
                self._all.append(st)
            self._free.put(st)

    def _discard(self, st: Store) -> None:
        with self._lock:
            self._opened -= 1
            if st in self._all:
                self._all.remove(st)
        with contextlib.suppress(Exception):
            st.close()

    def close(self) -> None:
        """Close every store of the pool."""
        with self._lock:
            stores, self._all = self._all, []
            self._opened = 0
        for st in stores:
            with contextlib.suppress(Exception):
                st.close()


@contextlib.contextmanager
def deadline(st: Store, seconds: float | None) -> Iterator[None]:
    """Stop the block's reads of ``st`` when it runs past ``seconds``.

    The block runs in one request thread: every statement on that thread's read
    connection and on the sandbox's cursors it borrows is interrupted, and the block
    raises :class:`~geomstore.errors.QueryTimeoutError` (the service answers 408).
    """
    if seconds is None:
        yield
        return
    advice = "ask for fewer checkpoints or points, or a smaller radius."
    with st._read_path().deadline(seconds, advice=advice):
        yield


class PartitionCache:
    """The last few partitions rebuilt for clients (a stored partition does not change)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[str, Partition] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, store: Store, partition_id: str, require: Callable[[Store, str], None]
    ) -> Partition:
        """The partition, rebuilt on a miss (``require`` raises for an unknown id)."""
        with self._lock:
            if partition_id in self._items:
                self._items.move_to_end(partition_id)
                return self._items[partition_id]
        require(store, partition_id)
        part = store.load_partition(partition_id)
        with self._lock:
            self._items[partition_id] = part
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return part


class ServiceState:
    """The pool, the settings and the metrics of one running service."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.limits = config.limits
        self.pool = StorePool(config.store, config.pool_size, data_path=config.data_path)
        self.metrics = Metrics()
        self.loaded = PartitionCache()
        self.started = time.time()
        self._writer_lock = threading.Lock()
        self._writer: Store | None = None

    @contextlib.contextmanager
    def reading(self, endpoint: str, timeout: float | None = None) -> Iterator[Store]:
        """A read-only store under the query deadline; the time spent counts as query time."""
        seconds = self.config.timeout if timeout is None else min(timeout, self.config.timeout)
        t0 = time.perf_counter()
        try:
            with self.pool.store(wait=seconds) as st, deadline(st, seconds):
                yield st
        finally:
            self.metrics.query(endpoint, time.perf_counter() - t0)

    @contextlib.contextmanager
    def writing(self) -> Iterator[Store]:
        """The store opened for writing (job submission): opened once, one writer at a time
        (reopening a DuckLake catalog beside open readers of the same process fails)."""
        with self._writer_lock:
            if self._writer is None:
                self._writer = Store(self.config.store, data_path=self.config.data_path)
            yield self._writer

    def close(self) -> None:
        """Close the pool and the writer."""
        self.pool.close()
        with self._writer_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
