"""The service under load and faults: real processes on loopback, every loop bounded.

16 clients x 200 mixed requests while a worker writes checkpoints into the same store;
a client that hangs up mid-answer; a query timing out while others go on; a restart
under retrying clients; hostile and malformed requests. Zero 5xx, no torn reads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest

import geomstore
from geomstore.errors import QueryTimeoutError
from tests.servers import Server, make_store, serve

SECRET = "GEOMSTORE-LOAD-SECRET-91c2"
CLIENTS = 16
REQUESTS = int(os.environ.get("GEOMSTORE_LOAD_REQUESTS", "200"))  # per client
BUDGET = float(os.environ.get("GEOMSTORE_LOAD_SECONDS", "300"))  # for all of them
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("load")
    (root / "secret.txt").write_text(SECRET)
    return make_store(root / "store")


@pytest.fixture(scope="module")
def server(store_path: str) -> Iterator[Server]:
    log = Path(store_path).parent / "server.log"
    with serve(store_path, "--pool", "4", "--timeout", "20", log=log) as srv:
        yield srv


def _mixed(url: str, seed: int, pids: list[str], stop: float) -> Counter[str]:
    """REQUESTS mixed requests; counts answers by kind and status, checks whole reads."""
    rng = np.random.default_rng(seed)
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(REQUESTS):
            if time.monotonic() > stop:
                seen["unfinished"] += REQUESTS - i
                break
            kind = ("sql", "lc", "sample", "regions", "point", "list")[i % 6]
            u = rng.uniform(-0.95, 0.95, 2).tolist()
            if kind == "sql":
                r = c.post(
                    "/api/sql",
                    json={
                        "sql": (
                            "SELECT p.partition_id, p.n_regions, (SELECT count(*) FROM regions r "
                            "WHERE r.partition_id = p.partition_id) AS nr FROM partitions p"
                        )
                    },
                )
                if r.status_code == 200:
                    for row in r.json()["rows"]:
                        if row["nr"] != row["n_regions"]:
                            seen["torn"] += 1
            elif kind == "lc":
                r = c.post(
                    "/api/lc",
                    json={
                        "model": "net",
                        "points": [u],
                        "radius": 0.1,
                        "checkpoints": ["step0", "step100"],
                    },
                )
            elif kind == "sample":
                r = c.post(
                    "/api/boundary/samples",
                    json={"model": "net", "n": 20, "seed": i, "checkpoints": ["step0"]},
                )
            elif kind == "regions":
                pid = pids[int(rng.integers(len(pids)))]
                r = c.get(f"/api/partitions/{pid}/regions", params={"format": "arrow"})
                if r.status_code == 200:
                    n = pa.ipc.open_stream(r.content).read_all().num_rows
                    seen["regions_rows"] += n
            elif kind == "point":
                r = c.post(
                    "/api/points/regions",
                    json={"model": "net", "points": [u], "checkpoints": ["step100"]},
                )
            else:
                r = c.get("/api/partitions", params={"model": "net"})
                if r.status_code == 200:
                    seen["listed"] += len(r.json()["rows"])
            seen[f"{kind} {r.status_code}"] += 1
            if r.status_code >= 400:
                seen[f"error {r.status_code} {r.text[:200]}"] += 1
    return seen


def test_sixteen_clients_while_a_worker_writes(server: Server, store_path: str) -> None:
    with geomstore.open(store_path, read_only=True) as local:
        before = local.partitions(model="net")
    pids = before.column("partition_id").to_pylist()
    regions_of = dict(zip(pids, before.column("n_regions").to_pylist()))
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.store_worker", "write", store_path, "100", "6", "16"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    stop = time.monotonic() + BUDGET
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda k: _mixed(server.url, k, pids, stop), range(CLIENTS)))
    finally:
        _, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err.decode()[-2000:]
    total: Counter[str] = Counter()
    for r in results:
        total.update(r)
    statuses = {
        k: v
        for k, v in total.items()
        if k.split()[0] in ("sql", "lc", "sample", "regions", "point", "list")
    }
    assert sum(statuses.values()) == CLIENTS * REQUESTS, total
    assert all(k.endswith(" 200") for k in statuses), total  # no 4xx, no 5xx
    assert total["torn"] == 0 and total["unfinished"] == 0
    assert total["regions_rows"] > 0
    with geomstore.open(store_path, read_only=True) as local:
        after = local.partitions(model="net")
    assert after.num_rows == len(pids) + 6  # the worker's checkpoints all landed
    # the listed partitions were always whole: regions served == n_regions listed
    for pid, n in regions_of.items():
        got = httpx.get(
            f"{server.url}/api/partitions/{pid}/regions",
            params={"format": "arrow", "columns": "region_id"},
        )
        assert pa.ipc.open_stream(got.content).read_all().num_rows == n
    metrics = httpx.get(server.url + "/metrics").text
    assert 'status="500"' not in metrics


def test_a_client_hanging_up_mid_answer(server: Server) -> None:
    body = json.dumps({"sql": "SELECT range AS i, 'x' || range AS s FROM range(90000)"})
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(
                (
                    f"POST /api/sql?format=csv HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
                ).encode()
            )
            assert s.recv(2048).startswith(b"HTTP/1.1 200")
        # closed with most of the answer unread
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        res = c.post("/api/sql", json={"sql": "SELECT count(*) AS n FROM range(90000)"})
        assert res.json()["rows"] == [{"n": 90000}]
    assert server.alive


def test_hostile_and_malformed_requests_keep_the_server_up(server: Server, store_path: str) -> None:
    root = Path(store_path).parent
    secret = root / "secret.txt"
    hostile: list[tuple[str, str, Any]] = [
        ("POST", "/api/sql", {"sql": f"SELECT * FROM read_text('{secret}')"}),
        ("POST", "/api/sql", {"sql": f"SELECT * FROM '{secret}'"}),
        ("POST", "/api/sql", {"sql": f"SELECT * FROM read_csv('{secret}', header=false)"}),
        ("POST", "/api/sql", {"sql": f"SELECT * FROM glob('{root}/*')"}),
        ("POST", "/api/sql", {"sql": f"ATTACH '{root}/evil.duckdb' AS e"}),
        ("POST", "/api/sql", {"sql": f"COPY regions TO '{root}/leak.csv'"}),
        ("POST", "/api/sql", {"sql": "SELECT 1; DROP TABLE regions"}),
        ("POST", "/api/sql", {"sql": "LOAD httpfs"}),
        ("POST", "/api/sql", {"sql": "SELECT * FROM duckdb_settings()"}),
        ("POST", "/api/sql", {"sql": "SELECT getenv('HOME')"}),
        ("POST", "/api/sql", {"sql": "SELEC broken"}),
        ("POST", "/api/sql", b'{"sql": '),
        ("POST", "/api/lc", b"[1, 2, 3]"),
        ("POST", "/api/lc", {"model": "net", "points": [[float("1e400"), 0]], "radius": 1}),
        ("POST", "/api/lc", {"model": "net", "points": "../../etc/passwd", "radius": 0.1}),
        ("POST", "/api/sql", b'{"sql": "' + b"y" * (12 * 2**20) + b'"}'),
        ("GET", "/api/partitions/../../etc/passwd/regions", None),
        ("GET", "/api/partitions/%2e%2e%2fsecret.txt/regions", None),
        ("GET", "/api/partitions/nope/edges", None),
        ("GET", "/api/checkpoints?model=' OR 1=1 --", None),
        ("GET", "/api/stats?model=net&slice=nope", None),
        ("GET", "/static/../../secret.txt", None),
        ("GET", "/static/%2e%2e/%2e%2e/secret.txt", None),
    ]

    def send(item: tuple[str, str, Any]) -> httpx.Response:
        method, path, body = item
        kw: dict[str, Any] = {}
        if isinstance(body, bytes):
            kw = {"content": body, "headers": {"content-type": "application/json"}}
        elif body is not None:
            kw = {"content": json.dumps(body), "headers": {"content-type": "application/json"}}
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.request(method, path, **kw)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, hostile))
    for (_, path, _), resp in zip(hostile, answers):
        assert 400 <= resp.status_code < 500, (path, resp.status_code, resp.text[:300])
        assert SECRET not in resp.text and str(root) not in resp.text, path
        assert "Traceback" not in resp.text
        if not path.startswith("/static"):
            assert resp.json()["error"]["message"], path
    assert not (root / "leak.csv").exists() and not (root / "evil.duckdb").exists()
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"


def test_a_query_times_out_while_others_go_on(store_path: str) -> None:
    with serve(store_path, "--timeout", "4") as srv:
        outcome: dict[str, Any] = {}
        with httpx.Client(base_url=srv.url, timeout=30) as c:  # every pooled store warm
            for _ in range(8):
                c.post("/api/sql", json={"sql": "SELECT count(*) AS n FROM partitions"})

        def slow() -> None:
            t0 = time.monotonic()
            with geomstore.connect(srv.url) as c:
                try:
                    c.sql("SELECT count(*) FROM range(1000000000000) a")
                except QueryTimeoutError as exc:
                    outcome["timeout"] = (exc.timeout, time.monotonic() - t0)

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.3)
        fast = []
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            while thread.is_alive() and len(fast) < 200:
                t0 = time.monotonic()
                r = c.post("/api/sql", json={"sql": "SELECT count(*) AS n FROM partitions"})
                assert r.status_code == 200 and r.json()["rows"][0]["n"] >= 3
                fast.append(time.monotonic() - t0)
        thread.join(30)
        assert "timeout" in outcome, "the runaway query was not stopped"
        limit, took = outcome["timeout"]
        assert limit == 4 and took < 20
        assert len(fast) >= 3 and float(np.median(fast)) < 1.0
        assert httpx.get(srv.url + "/healthz").status_code == 200


def test_restart_under_retrying_clients(store_path: str) -> None:
    with geomstore.open(store_path, read_only=True) as local:
        n = local.partitions(model="net").num_rows
    srv = Server(store_path).start()
    results: list[int] = []
    failures: list[str] = []
    done = threading.Event()

    def client_loop(k: int) -> None:
        with geomstore.connect(srv.url, retries=10) as c:
            c.backoff = 0.2
            for _ in range(60):
                if done.is_set():
                    break
                try:
                    results.append(c.partitions(model="net").num_rows)
                except Exception as exc:  # counted and reported below
                    failures.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        srv.stop()
        time.sleep(0.5)
        srv.start()
        for t in threads:
            t.join(120)
    finally:
        done.set()
        srv.stop()
    assert not failures, failures[:3]
    assert len(results) == 4 * 60 and set(results) == {n}
