"""The scaled-out shape end to end: PostgreSQL catalog + data in S3 + a local Ray cluster.

20 checkpoints x 2 slices computed as Ray tasks, one worker SIGKILLed mid-run, then
queries from another process: 40 partitions, each once and whole, all verified.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import geomstore
from tests.nets import BOX, mlp
from tests.s3server import s3_server
from tests.servers import start_ray
from tests.test_distributed import _export, _kill_first_task

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
SLICES = [BOX, geomstore.Slice.box((-2.0, -1.0), (1.0, 0.5), name="wide")]

READER = r"""
import json, sys
import numpy as np
import geomstore
from geomstore.queries import local_complexity, partition_stats

target, data = sys.argv[1], sys.argv[2]
with geomstore.open(target, data_path=data, read_only=True) as s:
    rows = s.sql(
        "SELECT p.partition_id, p.verified, p.n_regions, s.name AS slice, "
        "(SELECT count(*) FROM regions r WHERE r.partition_id = p.partition_id) AS nr, "
        "(SELECT sum(ST_Area(r.geometry)) FROM regions r "
        " WHERE r.partition_id = p.partition_id) AS area, "
        "ST_Area(s.domain) AS domain_area "
        "FROM partitions p JOIN slices s USING (slice_id)"
    ).table.to_pylist()
    u = np.random.default_rng(0).uniform(-0.9, 0.9, (16, 2))
    lc = local_complexity(s, model="e2e", slice="box", points=u, radius=0.2)
    stats = partition_stats(s, model="e2e", slice="wide")
    ckpts = s.sql("SELECT count(*) AS n FROM checkpoints").table.column("n")[0].as_py()
print(json.dumps({"rows": rows, "lc_rows": lc.num_rows, "stats_rows": stats.num_rows,
                  "checkpoints": ckpts}))
"""


def test_postgres_s3_and_ray_with_a_killed_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.pgserver import postgres_server

    torch.set_num_threads(1)
    ckpts = [_export(tmp_path / f"step-{i:03d}.pt2", mlp((10, 10), 3, seed=i)) for i in range(20)]
    with s3_server() as s3, postgres_server(tmp_path / "pg") as dsn:
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(k, raising=False)
        for k, v in s3.env().items():  # Ray workers inherit these from this process
            monkeypatch.setenv(k, v)
        bucket = s3.bucket()
        target, data = f"postgres:{dsn}", f"s3://{bucket}/e2e/"
        start_ray()
        killed: list[int] = []
        killer = threading.Thread(target=_kill_first_task, args=("_task", 120.0, killed))
        try:
            with geomstore.open(target, data_path=data) as store:
                killer.start()
                res = geomstore.compute(
                    store, ckpts, SLICES, model="e2e", device="cpu", verify=True, executor="ray"
                )
        finally:
            if killer.is_alive() or killer.ident is not None:
                killer.join(timeout=130)
            ray.shutdown()
        assert killed, "no Ray worker was seen running a task"
        assert not res.failed, [r.line() for r in res.failed]
        assert len(res.done) == 40 and len(set(res.partition_ids)) == 40
        out = subprocess.run(
            [sys.executable, "-c", READER, target, data],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        keys = s3.keys(bucket)
    rows = got["rows"]
    assert len(rows) == 40
    assert sorted(r["partition_id"] for r in rows) == sorted(res.partition_ids)
    assert all(r["verified"] is True for r in rows)
    assert all(r["n_regions"] == r["nr"] for r in rows)  # each written once, whole
    assert all(abs(r["area"] - r["domain_area"]) < 1e-9 for r in rows)  # regions tile the slice
    assert {r["slice"] for r in rows} == {"box", "wide"}
    assert got["checkpoints"] == 20 and got["stats_rows"] == 20
    assert got["lc_rows"] == 20 * 16
    assert keys and all(k.startswith("e2e/") for k in keys)
