"""The command line end to end on a real store: compute, queue, query, draw, export."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import geomstore
from geomstore.cli import app
from tests.nets import factory_mlp, mlp

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
BOX = "--box=-1,-1,1,1"


def ok(*args: str) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def fail(*args: object, cwd: Path = ROOT) -> str:
    """Run the real entry point: user errors print 'Error: ...' and exit 1, no traceback."""
    res = subprocess.run(
        [sys.executable, "-m", "geomstore", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert res.stderr.startswith("Error: ") and "Traceback" not in res.stderr, res.stderr
    return res.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four checkpoints of a 2-16-16-3 MLP: export programs with metrics, and state dicts."""
    d = tmp_path_factory.mktemp("run")
    (d / "ckpt").mkdir()
    (d / "weights").mkdir()
    net = factory_mlp()
    for step in (0, 10, 20, 30):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.05)
        torch.export.save(
            torch.export.export(net, (torch.zeros(1, 2),)), str(d / "ckpt" / f"step-{step:03d}.pt2")
        )
        (d / "ckpt" / f"step-{step:03d}.json").write_text(
            json.dumps({"step": step, "metrics": {"accuracy": step / 40}})
        )
        torch.save(net.state_dict(), d / "weights" / f"w-{step}.pt")
    return d


def test_compute_query_and_export(run: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert "schema version" in ok("init", store)
    out = ok("compute", store, str(run / "ckpt" / "*.pt2"), "--model", "m", BOX, "--verify")
    assert out.count("verified") == 4
    # the SQL path in all four formats, checked against the API
    with geomstore.open(store, read_only=True) as st:
        want = st.sql("SELECT step, n_regions FROM gs_partitions ORDER BY step").table.to_pylist()
    q = "SELECT step, n_regions FROM gs_partitions ORDER BY step"
    rows = list(csv.DictReader(io.StringIO(ok("sql", store, q, "--format", "csv"))))
    assert [(int(r["step"]), int(r["n_regions"])) for r in rows] == [
        (w["step"], w["n_regions"]) for w in want
    ]
    lines = ok("sql", store, q, "-f", "json").strip().splitlines()
    assert [json.loads(x) for x in lines] == want
    ok("sql", store, q, "-f", "parquet", "-o", tmp_path / "q.parquet")
    assert pq.read_table(tmp_path / "q.parquet").to_pylist() == want
    assert str(want[-1]["n_regions"]) in ok("sql", store, q)
    # the queries
    stats = ok("stats", store, "--model", "m", "-f", "json").strip().splitlines()
    assert [json.loads(x)["n_regions"] for x in stats] == [w["n_regions"] for w in want]
    lc = ok("lc", store, "--model", "m", "--grid", "12", "--radius", "0.1")
    assert "turning points" in lc and "lc_mean" in lc
    ok("sample", store, "-m", "m", "-n", "50", "-f", "parquet", "-o", tmp_path / "b.parquet")
    samples = pq.read_table(tmp_path / "b.parquet")
    assert samples.num_rows == 4 * 50 and {"u0", "u1", "x"} <= set(samples.column_names)
    assert "hausdorff" in ok("compare", store, "-m", "m", "-f", "csv").lower()
    # pictures
    for name, extra in (("p.png", []), ("p.svg", ["--color", "class"]), ("g.png", ["--grid"])):
        ok("plot", store, "-m", "m", "--out", tmp_path / name, *extra)
        assert (tmp_path / name).stat().st_size > 5_000
    ok("plot", store, "-m", "m", "--out", tmp_path / "a.gif", "--color", "lc")
    from PIL import Image

    assert Image.open(tmp_path / "a.gif").n_frames == 4
    # export and migrate
    assert "exported" in ok("export", store, tmp_path / "pq")
    assert (tmp_path / "pq" / "regions.parquet").exists()
    assert "0 pending" in ok("migrate", store, "--dry-run")


def test_submit_worker_watch_and_jobs(run: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    files = [str(f) for f in sorted((run / "weights").glob("*.pt"))]
    out = ok("submit", store, *files, "-m", "w", "--factory", "tests.nets:factory_mlp", BOX)
    assert "4 job(s)" in out
    ok("submit", store, *files, "-m", "w", "--factory", "tests.nets:factory_mlp", BOX)
    assert "4 done" in ok("worker", store, "--once", "--device", "cpu")
    assert ok("jobs", store, "-f", "csv").count(",done,") == 4
    ok("watch", store, run / "ckpt", "-m", "watched", BOX, "--once", "--interval", "0.2")
    ok("worker", store, "--once", "--device", "cpu")
    with geomstore.open(store, read_only=True) as st:
        got = st.sql(
            "SELECT model, count(*) AS n FROM gs_partitions GROUP BY model ORDER BY model"
        ).table.to_pylist()
    assert got == [{"model": "w", "n": 4}, {"model": "watched", "n": 4}]
    want = geomstore.partition(mlp((16, 16), 3, seed=0), geomstore.Slice.box((-1, -1), (1, 1)))
    assert want.n_regions > 0


def test_user_errors_are_one_line(run: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    ckpt = str(run / "ckpt" / "step-000.pt2")
    assert "no checkpoint file matches" in fail("compute", store, "nope/*.pt2", "-m", "m", BOX)
    assert "give a slice" in fail("compute", store, ckpt, "-m", "m")
    assert "four numbers" in fail("compute", store, ckpt, "-m", "m", "--box=1,2")
    weights = str(run / "weights" / "w-0.pt")
    assert "--factory" in fail("compute", store, weights, "-m", "m", BOX)
    assert "only SELECT" in fail("sql", store, "DELETE FROM regions")
    assert "no partitions of model" in fail("stats", store, "-m", "ghost")
    assert "no slice named" in fail("compute", store, ckpt, "-m", "m", "--slice", "ghost")
    assert "expected 3 inputs" in fail(
        "compute", store, ckpt, "-m", "m", "--through", _npy(tmp_path)
    )


def _npy(tmp_path: Path) -> Path:
    import numpy as np

    f = tmp_path / "two.npy"
    np.save(f, np.zeros((2, 2)))
    return f
