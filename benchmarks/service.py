"""Service speed: p50 / p99 latency and requests/s per endpoint of ``geomstore serve``. Prints JSON.

Usage: python benchmarks/service.py [--quick] [--requests 200] [--clients 8] [--seconds 10]
       [--width 64] [--big-width 400]

Fills a DuckLake store with 4 checkpoints of a 2-w-w-3 MLP (``--width``) and one large
partition of a 2-W-W-3 MLP (``--big-width``; about 100,000 regions at 400), starts
``geomstore serve`` as a real process on a free loopback port, then times ``--requests``
sequential requests per endpoint (p50, p99, requests/s of one client) and the requests/s
of ``--clients`` concurrent clients asking small queries for ``--seconds``. Targets on a
2-core machine: region at a point and LC at one point p99 < 50 ms; the regions of the
100,000-region partition as Arrow < 1 s; >= 200 small requests/s. The machine may be
shared: ``load_average`` says how busy it was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import geomstore
from tests.servers import Server

ARROW = {"Accept": "application/vnd.apache.arrow.stream"}


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
    ).eval()


def build(path: Path, width: int, big_width: int) -> dict[str, Any]:
    box = geomstore.Slice.box((-1, -1), (1, 1), name="box")
    out: dict[str, Any] = {}
    t = time.perf_counter()
    with geomstore.open(path) as store:
        for i in range(4):
            part = geomstore.partition(mlp(width, i), box, device="cpu")
            store.add(part, model="small", checkpoint=f"c{i}", step=i)
            out["small_regions"] = part.n_regions
        big = geomstore.partition(mlp(big_width, 100), box, device="cpu")
        out["big_partition"] = store.add(big, model="big", checkpoint="c0", step=0)
        out["big_regions"] = big.n_regions
    out["build_seconds"] = round(time.perf_counter() - t, 1)
    return out


def timed(fn: Callable[[], httpx.Response], n: int) -> dict[str, float]:
    fn()  # warm: pool connections, caches
    ts = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        resp = fn()
        ts.append(time.perf_counter() - t)
        if resp.status_code != 200:
            raise SystemExit(f"{resp.request.url}: HTTP {resp.status_code} {resp.text[:300]}")
    wall = time.perf_counter() - t0
    return {
        "n": n,
        "p50_ms": round(1000 * statistics.median(ts), 2),
        "p99_ms": round(1000 * float(np.quantile(ts, 0.99)), 2),
        "mean_ms": round(1000 * statistics.fmean(ts), 2),
        "requests_per_s": round(n / wall, 1),
    }


def concurrent(url: str, clients: int, seconds: float) -> dict[str, float]:
    """Small queries (a one-row SQL count, /healthz) from ``clients`` threads, each with
    its own connection."""
    counts = [0] * clients
    errors = [0] * clients
    stop = time.perf_counter() + seconds

    def run(k: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            i = 0
            while time.perf_counter() < stop:
                if i % 2:
                    r = c.get("/healthz")
                else:
                    r = c.post("/api/sql", json={"sql": "SELECT count(*) FROM partitions"})
                counts[k] += 1
                errors[k] += r.status_code != 200
                i += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": sum(counts),
        "errors": sum(errors),
        "requests_per_s": round(sum(counts) / wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small store, few requests (CI)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--big-width", type=int, default=400)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.seconds, args.big_width = 30, 3.0, 96
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        info = build(store, args.width, args.big_width)
        log = Path(tmp) / "server.log"
        server = Server(str(store), "--pool", "4", log=log).start()
        try:
            with httpx.Client(base_url=server.url, timeout=120) as c:
                pt = {"model": "small", "points": [[0.123, -0.456]], "checkpoints": ["c3"]}
                big = f"/api/partitions/{info['big_partition']}/regions"
                n = args.requests
                endpoints = {
                    "healthz": timed(lambda: c.get("/healthz"), n),
                    "models": timed(lambda: c.get("/api/models"), n),
                    "partitions": timed(lambda: c.get("/api/partitions?model=small"), n),
                    "sql_small": timed(
                        lambda: c.post("/api/sql", json={"sql": "SELECT count(*) FROM slices"}),
                        n,
                    ),
                    "region_at_point": timed(lambda: c.post("/api/points/regions", json=pt), n),
                    "lc_one_point": timed(lambda: c.post("/api/lc", json=pt | {"radius": 0.05}), n),
                    "boundary_samples_100": timed(
                        lambda: c.post(
                            "/api/boundary/samples",
                            json={"model": "small", "n": 100, "checkpoints": ["c3"]},
                        ),
                        max(5, n // 4),
                    ),
                    "stats_one_checkpoint": timed(
                        lambda: c.get("/api/stats?model=small&checkpoint=c3"), max(5, n // 4)
                    ),
                    "regions_big_arrow": timed(lambda: c.get(big, headers=ARROW), 5),
                }
            load = concurrent(server.url, args.clients, args.seconds)
        except Exception:
            if log.exists():  # what the server said
                print(log.read_text()[-4000:] if log.exists() else "", file=sys.stderr)
            raise
        finally:
            server.stop()
    result = {
        "benchmark": "service",
        "cpus": os.cpu_count(),
        "load_average": [round(v, 1) for v in os.getloadavg()],
        "store": info,
        "endpoints": endpoints,
        "concurrent_small_queries": load,
        "targets": {
            "region_at_point_p99_under_50ms": endpoints["region_at_point"]["p99_ms"] < 50,
            "lc_one_point_p99_under_50ms": endpoints["lc_one_point"]["p99_ms"] < 50,
            "regions_100k_arrow_under_1s": endpoints["regions_big_arrow"]["p50_ms"] < 1000,
            "small_queries_200_per_s": load["requests_per_s"] >= 200,
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
