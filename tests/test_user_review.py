"""What a first-time user ran into (a review that followed the README as a newcomer):
pickled modules next to the user, the port a server really took, output files named by
their format, paths that hold something else than a store, jobs that could never load,
exports among other files, and a .duckdb store held by another process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import geomstore
from geomstore.errors import StoreError
from geomstore.jobs import job_table
from geomstore.loading import ModelLoadError
from tests.nets import mlp
from tests.test_cli_fixes import fail
from tests.test_commands import BOX, ok

SCRIPT = shutil.which("geomstore") or str(Path(sys.executable).with_name("geomstore"))
CLASS = (
    "import torch\n"
    "class Net(torch.nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.a, self.b = torch.nn.Linear(2, 6), torch.nn.Linear(6, 1)\n"
    "    def forward(self, x):\n"
    "        return self.b(torch.relu(self.a(x)))\n"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("review")
    ok("compute", d / "st", _export(d / "net.pt2"), "-m", "m", BOX)
    return d / "st"


def _export(path: Path) -> Path:
    torch.export.save(torch.export.export(mlp((6,), 1, seed=2), (torch.zeros(1, 2),)), path)
    return path


@pytest.mark.skipif(not Path(SCRIPT).is_file(), reason="the geomstore script is not installed")
def test_the_script_unpickles_a_module_whose_class_is_next_to_the_user(tmp_path: Path) -> None:
    (tmp_path / "usermodel.py").write_text(CLASS)
    code = "import torch, usermodel; torch.save(usermodel.Net(), 'full.pt')"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    args = ["compute", "st", "full.pt", "-m", "m", BOX, "--trust-pickle"]
    res = subprocess.run([SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "1 of 1 partition(s) stored" in res.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["compute", "st2", "../full.pt", "-m", "m", BOX, "--trust-pickle"]
    res = subprocess.run(
        [SCRIPT, *args], cwd=elsewhere, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 1
    assert res.stderr.startswith("Error: cannot unpickle") and "No module named 'usermodel'" in (
        res.stderr
    )
    assert "run from the folder that holds that module" in res.stderr
    assert "Traceback" not in res.stderr


def _banner(proc: subprocess.Popen[str], wait: float = 90.0) -> str:
    """The server's 'serving ...' line (read within ``wait`` s; '' if it never came)."""
    assert proc.stderr is not None
    deadline, line = time.monotonic() + wait, ""
    while "serving" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "serve exited"
    return line


def _serve(store: Path, port: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "geomstore", "serve", str(store), "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )


def test_serve_on_port_0_names_the_port_it_took_and_a_taken_port_is_one_line(
    store: Path,
) -> None:
    proc = _serve(store, 0)
    try:
        line = _banner(proc)
        assert "serving" in line, line
        url = line.split(" on ", 1)[1].split()[0]
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert port != 0
        assert httpx.get(f"{url}healthz", timeout=10).json()["status"] == "ok"
        err = fail("serve", store, "--port", port)  # the port the first one holds
        assert f"port {port} on 127.0.0.1 is in use" in err and "--port 0" in err
        assert "serving" not in err
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "65535" in fail("serve", store, "--port", 70000)


def test_an_output_file_named_csv_json_or_parquet_takes_that_format(
    store: Path, tmp_path: Path
) -> None:
    query = "SELECT region_id, area FROM regions ORDER BY region_id LIMIT 3"
    ok("sql", store, query, "-o", tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines()[0] == "region_id,area"
    ok("sql", store, query, "-o", tmp_path / "r.jsonl")
    assert (tmp_path / "r.jsonl").read_text().startswith('{"region_id": 0, "area": ')
    ok("sql", store, query, "-o", tmp_path / "r.parquet")
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 3
    ok("sql", store, query, "-o", tmp_path / "r.txt")  # no format of its own: the table
    assert "region_id" in (tmp_path / "r.txt").read_text()
    ok("sql", store, query, "-f", "json", "-o", tmp_path / "r2.csv")  # --format wins
    assert (tmp_path / "r2.csv").read_text().startswith("{")


def test_a_path_that_holds_something_else_is_not_offered_to_init(tmp_path: Path) -> None:
    f = tmp_path / "inputs.npy"
    f.write_bytes(b"x")
    err = fail("stats", f, "-m", "m")
    assert "is a file but not a store" in err and f"geomstore init {f}" not in err
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "a.pt").write_bytes(b"x")
    err = fail("partitions", tmp_path / "ck")
    assert "folder with files but no store" in err and "init NEW_FOLDER" in err
    assert f"geomstore init {tmp_path / 'nothing'}" in fail("partitions", tmp_path / "nothing")


def test_weights_without_a_factory_are_refused_when_submitted_not_in_the_worker(
    store: Path, tmp_path: Path
) -> None:
    sd = tmp_path / "sd.pt"
    torch.save(mlp((6,), 1).state_dict(), sd)
    with geomstore.open(store) as st:
        before = job_table(st).num_rows
        with pytest.raises(ModelLoadError, match="factory= / --factory"):
            geomstore.submit(st, sd, geomstore.Slice.box((-1, -1), (1, 1)), model="m")
        with pytest.raises(ModelLoadError, match=r"not of the form package\.module:function"):
            spec = geomstore.ModelSpec(str(sd), "nocolon")
            geomstore.submit(st, spec, geomstore.Slice.box((-1, -1), (1, 1)), model="m")
    assert "holds weights" in fail("submit", store, sd, "-m", "m", BOX)
    with geomstore.open(store, read_only=True) as st:
        assert job_table(st).num_rows == before  # no job that no worker could load
    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(sd, w / "a.pt")
    out = ok("watch", store, w, "-m", "m", BOX, "--once", "--pattern", "*.pt")
    assert "skipped a.pt" in out and "Ctrl-C" not in out
    out = ok("watch", store, w, "-m", "m", BOX, "--once")
    assert "no file in" in out and "'*.pt2'" in out


def test_an_export_never_mixes_with_other_files(store: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "step-1.pt").write_bytes(b"weights")
    assert "holds other files (step-1.pt)" in fail("export", store, ck)
    assert sorted(p.name for p in ck.iterdir()) == ["step-1.pt"]
    with geomstore.open(store, read_only=True) as st:
        with pytest.raises(StoreError, match="holds other files"):
            st.export(ck)
        first = st.export(tmp_path / "exp")
        again = st.export(tmp_path / "exp")  # an earlier export is replaced
    assert first == again and all(p.is_file() for p in again)
    assert "is a file" in fail("export", store, ck / "step-1.pt")
    assert "is a URL" in fail("export", store, "s3://bucket/out/", cwd=tmp_path)
    assert not (tmp_path / "s3:").exists()


def test_a_duckdb_store_held_elsewhere_says_so_in_geomstores_words(tmp_path: Path) -> None:
    target = tmp_path / "one.duckdb"
    with geomstore.open(target):
        pass
    code = f"import geomstore, sys, time; s = geomstore.open({str(target)!r}); print('held'); "
    code += "sys.stdout.flush(); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        err = fail("partitions", target)
        assert "another process holds it" in err and "directory store" in err
        assert "-readonly" not in err
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_errors_on_a_pipe_are_not_wrapped(tmp_path: Path) -> None:
    net = _export(tmp_path / "net.pt2")
    cmd = [sys.executable, "-m", "geomstore", "compute", str(tmp_path / "s"), str(net)]
    res = subprocess.run(
        [*cmd, "-m", "a-model-with-a-rather-long-name", BOX],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stderr.splitlines() if "regions" in x and "partition" in x)
    assert len(line.split("-> partition ")[1].strip()) == 20, line  # the id on the same line


def test_add_points_stores_a_data_set_the_queries_then_take(store: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, (40, 2)), rng.integers(0, 2, 40)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.save(tmp_path / "x.npy", x[:10])
    np.save(tmp_path / "y.npy", y[:10])
    out = ok("add-points", store, "pts", tmp_path / "d.npz", BOX)
    assert "stored 40 points as 'pts'" in out
    ok(
        "add-points",
        store,
        "few",
        tmp_path / "x.npy",
        "--labels",
        tmp_path / "y.npy",
        "--slice",
        "box(-1,-1,1,1)",
        "--split",
        "test",
    )
    with geomstore.open(store, read_only=True) as st:
        got = st.sql(
            "SELECT d.name, p.split, count(*) AS n, sum(p.label) AS s FROM points p "
            "JOIN datasets d USING (dataset_id) GROUP BY ALL ORDER BY d.name"
        ).table.to_pylist()
    assert got == [
        {"name": "few", "split": "test", "n": 10, "s": int(y[:10].sum())},
        {"name": "pts", "split": "train", "n": 40, "s": int(y.sum())},
    ]
    lc = ok("lc", store, "-m", "m", "--points", "pts", "-r", "0.1", "-f", "json")
    assert '"n_points": 40' in lc
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    assert "Object arrays cannot be loaded" in fail(
        "add-points", store, "o", tmp_path / "obj.npy", BOX
    )
    assert "give the slice(s)" in fail("add-points", store, "o", tmp_path / "x.npy")
    assert "one entry per point" in fail(
        "add-points", store, "o", tmp_path / "x.npy", "--labels", tmp_path / "d.npz", BOX
    )
    assert "no store at" in fail("add-points", tmp_path / "none", "o", tmp_path / "x.npy", BOX)


def test_submit_says_how_many_jobs_are_new(tmp_path: Path) -> None:
    net = _export(tmp_path / "net.pt2")
    first = ok("submit", tmp_path / "q", net, "-m", "m", BOX)
    assert "1 job(s) in the queue" in first and "(1 new, 0 submitted before)" in first
    again = ok("submit", tmp_path / "q", net, "-m", "m", BOX)
    assert "1 job(s) in the queue" in again and "(0 new, 1 submitted before)" in again


def test_a_catalog_password_never_shows_on_the_success_paths(tmp_path: Path) -> None:
    """init, submit, worker and serve name the store they work on; a PostgreSQL DSN's
    password (trust auth here: the server ignores it, the DSN still carries it) is masked."""
    from tests.pgserver import postgres_server

    secret = "Planted-Secret-77"
    net = _export(tmp_path / "net.pt2")
    env = {**os.environ, "GEOMSTORE_DATA_PATH": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    seen: list[str] = []

    def run(*args: object) -> str:
        cmd = [sys.executable, "-m", "geomstore", *map(str, args)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        seen.append(res.stdout + res.stderr)
        return res.stdout + res.stderr

    with postgres_server(tmp_path / "pg") as dsn:
        target = f"postgres:{dsn} password={secret}"
        assert "password=***" in run("init", target)
        out = run("submit", target, net, "-m", "m", BOX)
        assert "run: geomstore worker 'postgres:" in out  # quoted: it has spaces
        run("worker", target, "--once", "--device", "cpu")
        proc = subprocess.Popen(
            [sys.executable, "-m", "geomstore", "serve", target, "--port", "0"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        try:
            line = _banner(proc)
            seen.append(line)
            assert "serving postgres:" in line
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert secret not in "".join(seen)


def test_a_refused_data_path_leaves_no_folder_behind(tmp_path: Path) -> None:
    from geomstore.errors import DataPathError

    geomstore.open(tmp_path / "s", data_path=tmp_path / "kept").close()
    with pytest.raises(DataPathError, match="keeps its data files at"):
        geomstore.open(tmp_path / "s", data_path=tmp_path / "other" / "deep")
    assert not (tmp_path / "other").exists()
    with geomstore.open(tmp_path / "s") as st:  # and the store is as it was
        assert st.data_path == f"{tmp_path / 'kept'}/"


def test_ray_on_a_duckdb_store_is_refused_before_the_file_is_made(tmp_path: Path) -> None:
    net = _export(tmp_path / "net.pt2")
    err = fail("compute", tmp_path / "x.duckdb", net, "-m", "m", BOX, "--ray")
    assert "belongs to one process" in err
    assert not (tmp_path / "x.duckdb").exists()
