"""The job queue with real worker processes: killed, terminated, failing; each job once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import geomstore
from geomstore.jobs import job_table, submit
from geomstore.loading import ModelSpec
from geomstore.worker import Worker
from tests.nets import BOX, mlp

ROOT = Path(__file__).resolve().parents[1]


def _export(path: Path, net: torch.nn.Module) -> Path:
    torch.export.save(torch.export.export(net, (torch.zeros(1, 2),)), str(path))
    return path


def _worker(store: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "geomstore", "worker", str(store), "--device", "cpu", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _jobs(store: Path) -> list[dict[str, object]]:
    with geomstore.open(store, read_only=True) as st:
        return job_table(st).to_pylist()


def _wait(pred: object, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_workers_killed_mid_job_leave_every_job_done_exactly_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    n = 8
    with geomstore.open(store) as st:
        for i in range(n):
            f = _export(tmp_path / f"step-{i}.pt2", mlp((256, 256), 2, seed=i))
            submit(st, ModelSpec(str(f)), BOX, model="wide")
    opts = ("--heartbeat", "0.3", "--stale-after", "4", "--poll", "0.3")
    victim = _worker(store, *opts)
    _wait(
        lambda: any(
            j["status"] == "running" and str(j["worker"]).endswith(f":{victim.pid}")
            for j in _jobs(store)
        ),
        120,
    )
    victim.kill()  # SIGKILL mid-job: no chance to clean up
    victim.wait()
    others = [_worker(store, *opts) for _ in range(2)]
    try:
        _wait(lambda: all(j["status"] == "done" for j in _jobs(store)), 300)
    finally:
        for w in others:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(timeout=60) for w in others]
    assert codes == [0, 0], [w.stderr.read().decode()[-2000:] for w in others if w.stderr]
    jobs = _jobs(store)
    assert len(jobs) == n and all(j["status"] == "done" for j in jobs)
    assert any(j["attempts"] == 2 for j in jobs)  # the killed worker's job, claimed again
    assert list((store / "heartbeats").iterdir()) == []  # the dead worker's beat file too
    with geomstore.open(store, read_only=True) as st:
        parts = st.sql(
            "SELECT p.partition_id, p.n_regions, count(r.region_id) AS stored FROM partitions p "
            "JOIN regions r USING (partition_id) GROUP BY ALL"
        ).table.to_pylist()
        ckpts = st.sql("SELECT count(*) AS n FROM checkpoints").table.column("n")[0].as_py()
    assert len(parts) == n and ckpts == n
    assert {p["partition_id"] for p in parts} == {j["partition_id"] for j in jobs}
    assert all(p["n_regions"] == p["stored"] for p in parts)  # written once, whole
    want = geomstore.partition(mlp((256, 256), 2, seed=3), BOX, device="cpu").n_regions
    assert want in {p["n_regions"] for p in parts}


def test_sigterm_releases_the_running_job(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with geomstore.open(store) as st:
        f = _export(tmp_path / "big.pt2", mlp((256, 256, 256), 2, seed=0))
        submit(st, ModelSpec(str(f)), BOX, model="deep")
    w = _worker(store, "--heartbeat", "0.3", "--poll", "0.3")
    _wait(lambda: _jobs(store)[0]["status"] == "running", 120)
    time.sleep(0.5)
    w.send_signal(signal.SIGTERM)
    assert w.wait(timeout=60) == 0
    stderr = w.stderr.read().decode() if w.stderr else ""
    assert "released" in stderr and "Traceback" not in stderr
    (job,) = _jobs(store)
    assert job["status"] == "queued" and job["attempts"] == 0 and job["worker"] is None
    with geomstore.open(store) as st:
        assert Worker(st, device="cpu").run(once=True)["done"] == 1
        assert job_table(st).column("status").to_pylist() == ["done"]


def test_failing_jobs_end_failed_with_their_error(tmp_path: Path) -> None:
    store = tmp_path / "store"
    bad = _export(
        tmp_path / "gelu.pt2", torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.GELU())
    )
    flaky = tmp_path / "flakymod.py"
    flaky.write_text("def make():\n    raise RuntimeError('out of luck')\n")
    weights = tmp_path / "w.pt"
    torch.save(mlp((4,), 2).state_dict(), weights)
    sys.path.insert(0, str(tmp_path))
    try:
        with geomstore.open(store) as st:
            submit(st, ModelSpec(str(bad)), BOX, model="gelu")
            submit(st, ModelSpec(str(weights), "flakymod:make"), BOX, model="flaky")
            counts = Worker(st, device="cpu", max_attempts=3).run(once=True)
            jobs = {j["model"]: j for j in job_table(st).to_pylist()}
    finally:
        sys.path.remove(str(tmp_path))
    assert counts["failed"] == 2 and counts["retry"] == 2 and counts["done"] == 0
    assert jobs["gelu"]["status"] == "failed" and jobs["gelu"]["attempts"] == 1  # user error
    assert "gelu" in str(jobs["gelu"]["error"]).lower()
    assert jobs["flaky"]["status"] == "failed" and jobs["flaky"]["attempts"] == 3  # retried
    assert "RuntimeError: out of luck" in str(jobs["flaky"]["error"])


def test_submit_is_idempotent_and_checks_files(tmp_path: Path) -> None:
    f = _export(tmp_path / "step-7.pt2", mlp((8,), 2))
    with geomstore.open(tmp_path / "store") as st:
        a = submit(st, ModelSpec(str(f)), BOX, model="m")
        b = submit(st, ModelSpec(str(f)), BOX, model="m")
        assert a == b and job_table(st).num_rows == 1
        assert job_table(st).column("step").to_pylist() == [7]
        with pytest.raises(geomstore.GeomstoreError, match="does not exist"):
            submit(st, ModelSpec(str(tmp_path / "nope.pt2")), BOX, model="m")


def test_worker_is_still_importable_from_jobs() -> None:
    """``Job`` and ``Worker`` moved to geomstore.worker; code importing them from jobs works."""
    import geomstore.jobs
    import geomstore.worker
    from geomstore.jobs import Job
    from geomstore.jobs import Worker as OldWorker

    assert OldWorker is geomstore.worker.Worker and Job is geomstore.worker.Job
    assert {"Job", "Worker"} <= set(geomstore.jobs.__all__)
    with pytest.raises(AttributeError):
        _ = geomstore.jobs.NoSuchName


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_recorder_queues_jobs_that_a_worker_runs(tmp_path: Path) -> None:
    net = mlp((16,), 3)
    with geomstore.open(tmp_path / "store") as st:
        rec = geomstore.Recorder(st, "rec", [BOX], every=5, queue=True)
        net.train()
        for step in range(12):
            rec(net, step, {"loss": float(step)})
        assert net.training  # restored
        assert job_table(st).num_rows == 3
        assert Worker(st, device="cpu").run(once=True)["done"] == 3
        steps = st.sql("SELECT step, metrics FROM gs_partitions ORDER BY step").table.to_pylist()
    assert [s["step"] for s in steps] == [0, 5, 10]
    assert '"loss": 10.0' in steps[-1]["metrics"]


def test_two_worker_processes_on_a_postgres_catalog(tmp_path: Path) -> None:
    """Heartbeats go to the catalog (job_heartbeats) when the store is not a directory."""
    from tests.pgserver import postgres_server

    data = tmp_path / "files"
    with postgres_server(tmp_path / "pg") as dsn:
        target = f"postgres:{dsn}"
        with geomstore.open(target, data_path=data) as st:
            for i in range(4):
                f = _export(tmp_path / f"step-{i}.pt2", mlp((256, 256), 2, seed=i))
                submit(st, ModelSpec(str(f)), BOX, model="pg")
        env = {**os.environ, "GEOMSTORE_DATA_PATH": str(data)}
        cmd = [sys.executable, "-m", "geomstore", "worker", target, "--device", "cpu", "--once"]
        procs = [
            subprocess.Popen(
                [*cmd, "--heartbeat", "0.2"], cwd=ROOT, env=env, stderr=subprocess.PIPE
            )
            for _ in range(2)
        ]
        for p in procs:
            assert p.wait(timeout=300) == 0, p.stderr.read().decode() if p.stderr else ""
        with geomstore.open(target, data_path=data, read_only=True) as st:
            jobs = job_table(st).to_pylist()
            n = st.sql("SELECT count(*) AS n FROM partitions").table.column("n")[0].as_py()
            beats = st.sql("SELECT count(*) AS n FROM job_heartbeats").table.column("n")[0].as_py()
    assert [j["status"] for j in jobs] == ["done"] * 4 and n == 4
    assert all(j["attempts"] == 1 for j in jobs)
    assert beats > 0  # each job computes for ~1 s, beating every 0.2 s
