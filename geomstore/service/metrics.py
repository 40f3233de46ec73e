"""Request counters and latency histograms in the Prometheus text format (no dependency)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

__all__ = ["Metrics"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(_BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        for i, edge in enumerate(_BUCKETS):
            if seconds <= edge:
                self.counts[i] += 1
        self.total += 1
        self.sum += seconds


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Thread-safe counters of requests, errors, request latency and query time.

    Examples
    --------
    >>> m = Metrics()
    >>> m.request("/api/models", "GET", 200, 0.004)
    >>> 'geomstore_requests_total{endpoint="/api/models",method="GET",status="200"} 1' in m.render()
    True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._errors: dict[tuple[str, str], int] = defaultdict(int)
        self._latency: dict[str, _Histogram] = defaultdict(_Histogram)
        self._query: dict[str, _Histogram] = defaultdict(_Histogram)
        self._in_flight = 0
        self._started = time.time()

    def start(self) -> None:
        """One more request in flight."""
        with self._lock:
            self._in_flight += 1

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count a finished request (``endpoint`` is the route template, not the raw path)."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            self._requests[(endpoint, method, status)] += 1
            self._latency[endpoint].observe(seconds)

    def error(self, endpoint: str, kind: str) -> None:
        """Count an error answer by its type."""
        with self._lock:
            self._errors[(endpoint, kind)] += 1

    def query(self, endpoint: str, seconds: float) -> None:
        """Time spent in the store (queries) for one request."""
        with self._lock:
            self._query[endpoint].observe(seconds)

    def render(self) -> str:
        """Every metric in the Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []
        with self._lock:
            out += [
                "# HELP geomstore_requests_total HTTP requests answered.",
                "# TYPE geomstore_requests_total counter",
            ]
            for (ep, method, status), n in sorted(self._requests.items()):
                out.append(
                    f'geomstore_requests_total{{endpoint="{_label(ep)}",method="{method}",'
                    f'status="{status}"}} {n}'
                )
            out += [
                "# HELP geomstore_errors_total Error answers by error type.",
                "# TYPE geomstore_errors_total counter",
            ]
            for (ep, kind), n in sorted(self._errors.items()):
                out.append(
                    f'geomstore_errors_total{{endpoint="{_label(ep)}",type="{_label(kind)}"}} {n}'
                )
            for name, helptext, hists in (
                ("geomstore_request_seconds", "Request latency.", self._latency),
                ("geomstore_query_seconds", "Time spent querying the store.", self._query),
            ):
                out += [f"# HELP {name} {helptext}", f"# TYPE {name} histogram"]
                for ep, h in sorted(hists.items()):
                    lab = f'endpoint="{_label(ep)}"'
                    for edge, n in zip(_BUCKETS, h.counts):
                        out.append(f'{name}_bucket{{{lab},le="{edge}"}} {n}')
                    out.append(f'{name}_bucket{{{lab},le="+Inf"}} {h.total}')
                    out.append(f"{name}_sum{{{lab}}} {h.sum:.6f}")
                    out.append(f"{name}_count{{{lab}}} {h.total}")
            out += [
                "# HELP geomstore_requests_in_flight Requests being answered now.",
                "# TYPE geomstore_requests_in_flight gauge",
                f"geomstore_requests_in_flight {self._in_flight}",
                "# HELP geomstore_start_time_seconds When the server started (Unix time).",
                "# TYPE geomstore_start_time_seconds gauge",
                f"geomstore_start_time_seconds {self._started:.3f}",
            ]
        return "\n".join(out) + "\n"
