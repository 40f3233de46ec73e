"""The command line's edges: paths without a store, impossible devices, bad output files,
bad slice files, --grid, metrics beside local complexity, factories that raise, and
loading options that make a job of their own."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import geomstore
from geomstore.cli.queries import grid_points
from geomstore.errors import CheckpointConflictError
from geomstore.jobs import job_table
from tests.nets import mlp
from tests.test_commands import BOX, ROOT, ok
from tests.test_commands import fail as run_failing


def fail(*args: object, cwd: Path = ROOT) -> str:
    """The real entry point: one 'Error: ...' line on stderr, exit code 1, no traceback."""
    err = run_failing(*args, cwd=cwd)
    assert err.count("\n") == 1, err
    return err.strip()


def snapshot(store: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    with geomstore.open(store, read_only=True) as st:
        return st.partitions().to_pylist(), job_table(st).to_pylist()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with two checkpoints of a 2-8-3 MLP that carry an accuracy, one queued job,
    a pickled whole module, a garbage file and a factory module."""
    d = tmp_path_factory.mktemp("run")
    for step in (10, 20):
        net = mlp((8,), 3, seed=step)
        f = d / f"step-{step}.pt2"
        torch.export.save(torch.export.export(net, (torch.zeros(1, 2),)), str(f))
        f.with_suffix(".json").write_text(
            json.dumps({"step": step, "metrics": {"accuracy": step / 40}})
        )
    torch.save(mlp((8,), 3, seed=1), d / "pickled.pt")
    (d / "garbage.pt").write_bytes(b"\x80\x04garbage")
    (d / "mymodels.py").write_text(
        "import torch\n"
        "def boom():\n"
        "    raise RuntimeError('factory exploded')\n"
        "def gelu():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.GELU(), "
        "torch.nn.Linear(8, 3))\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = torch.nn.Linear(2, 8), torch.nn.Linear(8, 3)\n"
        "    def forward(self, x):\n"
        "        return self.b(torch.nn.functional.gelu(self.a(x)))  # the user's line\n"
        "def custom():\n"
        "    return Net()\n"
    )
    torch.save(
        torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Linear(8, 3)).state_dict(), d / "w.pt"
    )
    ok("init", d / "S")
    ok("compute", d / "S", d / "step-*.pt2", "-m", "m", BOX)
    ok("submit", d / "S", d / "step-10.pt2", "-m", "queued", BOX)
    return d


# 1. a mistyped store path ------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ("jobs",),
        ("worker", "--once", "--device", "cpu"),
        ("export", "OUT"),
        ("migrate",),
        ("stats", "-m", "m"),
        ("lc", "-m", "m", "--grid", "3", "-r", "0.2"),
    ],
    ids=lambda a: a[0],
)
def test_commands_that_read_a_store_refuse_a_path_without_one(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    missing = tmp_path / "typo"
    cmd, *rest = args
    rest = [str(tmp_path / "out") if a == "OUT" else a for a in rest]
    line = fail(cmd, missing, *rest)
    assert line == f"Error: no store at {missing}; create one with `geomstore init {missing}`."
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_init_compute_submit_and_watch_still_create_stores(run: Path, tmp_path: Path) -> None:
    ok("init", tmp_path / "a")
    ok("compute", tmp_path / "b", run / "step-10.pt2", "-m", "m", BOX)
    ok("submit", tmp_path / "c", run / "step-10.pt2", "-m", "m", BOX)
    (tmp_path / "ckpt").mkdir()
    ok("watch", tmp_path / "d", tmp_path / "ckpt", "-m", "m", BOX, "--once", "--interval", "0")
    ok("init", tmp_path / "e.duckdb")
    for name in ("a", "b", "c", "d", "e.duckdb"):
        with geomstore.open(tmp_path / name, read_only=True) as st:
            assert st.schema_version > 0
    ok("jobs", tmp_path / "e.duckdb")  # a .duckdb store is a store too


# 2. an impossible device -------------------------------------------------------------------
def test_worker_refuses_an_impossible_device_and_leaves_the_jobs_queued(run: Path) -> None:
    before = snapshot(run / "S")
    line = fail("worker", run / "S", "--device", "tpu", "--once")
    assert line == "Error: device must be one of 'auto', 'cpu', 'cuda[:N]'; got 'tpu'."
    if not torch.cuda.is_available():
        line = fail("worker", run / "S", "--device", "cuda", "--once")
        assert "CUDA is not available" in line
    assert snapshot(run / "S") == before
    assert [(j["status"], j["attempts"]) for j in before[1]] == [("queued", 0)]


# 3. one Error line instead of a traceback ------------------------------------------------------
def test_bad_output_files_and_slice_files_are_one_error_line(run: Path, tmp_path: Path) -> None:
    store = run / "S"
    before = snapshot(store)
    bad = tmp_path / "nonexistent" / "x.csv"
    line = fail("stats", store, "-m", "m", "-f", "csv", "-o", bad)
    assert line == (
        f"Error: cannot write {bad}: No such file or directory; check --output's folder exists."
    )
    line = fail("plot", store, "-m", "m", "--out", tmp_path / "p.bmpx")
    assert line.startswith(f"Error: {tmp_path / 'p.bmpx'}: cannot write a picture as .bmpx; ")
    assert ".png" in line and ".svg" in line and ".pdf" in line
    assert not (tmp_path / "p.bmpx").exists()
    line = fail("compute", store, run / "step-10.pt2", "-m", "m", "--through", run / "garbage.pt")
    assert line.startswith(f"Error: cannot read three inputs from {run / 'garbage.pt'}: not a ")
    assert snapshot(store) == before


# 4. --grid N --------------------------------------------------------------------------------
def test_grid_points_are_n_by_n_cell_centres_inside_the_domain() -> None:
    square = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    for n in (1, 3, 10):
        g = grid_points(square, n)
        assert g.shape == (n * n, 2)
        assert np.all(np.abs(g) < 1)
    assert grid_points(square, 1).tolist() == [[0.0, 0.0]]
    triangle = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert 0 < len(grid_points(triangle, 10)) < 100  # fewer where the domain is not a box


def test_lc_grid_gives_n_by_n_points_and_refuses_n_below_one(run: Path) -> None:
    for n in (1, 3):
        rows = list(
            csv.DictReader(
                io.StringIO(ok("lc", run / "S", "-m", "m", "--grid", n, "-r", 0.2, "-f", "csv"))
            )
        )
        assert {int(r["n_points"]) for r in rows} == {n * n}
    line = fail("lc", run / "S", "-m", "m", "--grid", "0", "-r", "0.2")
    assert line == "Error: --grid N needs N >= 1 (an N x N grid of points); got 0."


# 5. stored metrics beside local complexity; 9. CSV line endings -------------------------------
def test_lc_shows_the_checkpoints_metrics_in_every_format(run: Path) -> None:
    args = ("lc", run / "S", "-m", "m", "--grid", "4", "-r", "0.2")
    text = ok(*args, "-f", "csv")
    assert "\r" not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(int(r["step"]), float(r["accuracy"])) for r in rows] == [(10, 0.25), (20, 0.5)]
    lines = [json.loads(x) for x in ok(*args, "-f", "json").splitlines()]
    assert [r["accuracy"] for r in lines] == [0.25, 0.5] and "metrics" not in lines[0]
    assert "accuracy" in ok(*args)


# 6. factories that raise, and the user's source line ---------------------------------------------
def test_a_factory_that_raises_is_named(run: Path) -> None:
    line = fail("compute", run / "T", "w.pt", "-m", "f", "--factory", "mymodels:boom", BOX, cwd=run)
    assert line == (
        "Error: factory 'mymodels:boom' raised RuntimeError: factory exploded (while building "
        f"the model for {run / 'w.pt'})"
    )


def test_a_refused_layer_names_the_users_line_not_the_cli(run: Path) -> None:
    torch.save(
        torch.nn.Sequential(
            torch.nn.Linear(2, 8), torch.nn.GELU(), torch.nn.Linear(8, 3)
        ).state_dict(),
        run / "g.pt",
    )
    line = fail("compute", run / "T", "g.pt", "-m", "g", "--factory", "mymodels:gelu", BOX, cwd=run)
    assert "aten.gelu.default at module '1' (GELU)" in line
    assert "typer" not in line and "click" not in line and "sys.exit" not in line
    torch.save(
        {
            "a.weight": torch.zeros(8, 2),
            "a.bias": torch.zeros(8),
            "b.weight": torch.zeros(3, 8),
            "b.bias": torch.zeros(3),
        },
        run / "c.pt",
    )
    line = fail(
        "compute", run / "T", "c.pt", "-m", "c", "--factory", "mymodels:custom", BOX, cwd=run
    )
    assert f"{run / 'mymodels.py'}:11: return self.b(torch.nn.functional.gelu(self.a(x)))" in line


# 7. pandas ------------------------------------------------------------------------------------
def test_query_results_convert_to_pandas(run: Path) -> None:
    from geomstore.queries import partition_stats

    with geomstore.open(run / "S", read_only=True) as st:
        df = partition_stats(st, model="m").to_pandas()
        sql = st.sql("SELECT step, n_regions FROM gs_partitions ORDER BY step").table.to_pandas()
    assert list(df["step"]) == [10, 20] and list(sql["step"]) == [10, 20]


# 8. loading options make their own job ----------------------------------------------------------
def test_a_job_that_needs_trust_pickle_is_refused_without_it(run: Path, tmp_path: Path) -> None:
    store = tmp_path / "P"
    args = ("submit", store, run / "pickled.pt", "-m", "pk", BOX)
    ok("init", store)
    assert "--trust-pickle" in fail(*args)  # refused now, not failed later in a worker
    assert snapshot(store)[1] == []
    ok(*args, "--trust-pickle")
    ok(*args, "--trust-pickle")  # the same options: the same job
    ok("worker", store, "--once", "--device", "cpu")
    parts, jobs = snapshot(store)
    assert [j["status"] for j in jobs] == ["done"]
    assert len(parts) == 1 and parts[0]["model"] == "pk"


# 9. the examples' --help -----------------------------------------------------------------------
def test_each_examples_help_has_its_whole_first_paragraph() -> None:
    for name, tail in (
        ("moons_mlp", "then queried and plotted."),
        ("digits_cnn", "through three digit images."),
        ("inr_levelsets", "level sets of its output."),
    ):
        res = subprocess.run(
            [sys.executable, f"examples/{name}.py", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        assert tail in " ".join(res.stdout.split()), res.stdout


def test_a_worker_object_refuses_a_device_this_machine_lacks(tmp_path: Path) -> None:
    from geomstore.errors import GeomstoreError
    from geomstore.worker import Worker

    with geomstore.open(tmp_path / "s") as st:
        with pytest.raises(GeomstoreError, match="tpu"):
            Worker(st, device="tpu")
        assert Worker(st, device="cpu").device == "cpu"


def test_a_retrained_checkpoint_under_a_stored_name_needs_replace(tmp_path: Path) -> None:
    """A second training run written under the same --model: its step-10 has other weights
    than the stored step-10. It fails with the way out named, and --replace replaces it."""
    store = tmp_path / "store"
    ckpt = tmp_path / "step-10.pt2"
    for seed in (1, 2):
        net = mlp((8,), 3, seed=seed)
        torch.export.save(torch.export.export(net, (torch.zeros(1, 2),)), str(ckpt))
        if seed == 1:
            ok("compute", store, ckpt, "--model", "m", BOX, "--device", "cpu")
            before = snapshot(store)
    err = fail("compute", store, ckpt, "--model", "m", BOX, "--device", "cpu")
    assert "'step-10' of model 'm'" in err and "--replace" in err
    assert snapshot(store) == before
    ok("compute", store, ckpt, "--model", "m", BOX, "--device", "cpu", "--replace")
    rows, _ = snapshot(store)
    assert len(rows) == 1 and rows[0]["partition_id"] != before[0][0]["partition_id"]


def test_recording_a_second_run_under_one_name(tmp_path: Path) -> None:
    box = geomstore.Slice.box((-1, -1), (1, 1))
    with geomstore.open(tmp_path / "s") as st:
        geomstore.Recorder(st, "run", box)(mlp((6,), 2, seed=1), 0)
        with pytest.raises(CheckpointConflictError, match="replace=True"):
            geomstore.Recorder(st, "run", box)(mlp((6,), 2, seed=2), 0)
        pid = geomstore.Recorder(st, "run", box, replace=True)(mlp((6,), 2, seed=2), 0)
        assert st.partitions(model="run").column("partition_id").to_pylist() == pid


def test_a_bad_slice_argument_makes_no_store(tmp_path: Path, run: Path) -> None:
    ckpt = run / "step-10.pt2"
    store = tmp_path / "new"
    (tmp_path / "two.npy").write_bytes(b"not an array")
    for cmd in ("compute", "submit"):
        fail(cmd, store, ckpt, "--model", "m", "--through", tmp_path / "two.npy")
        fail(cmd, store, ckpt, "--model", "m", "--box=1,1,0,0")
        err = fail(cmd, store, ckpt, "--model", "m", "--slice", "plane")
        assert "no store at" in err
        assert not store.exists()


def test_a_verified_submission_is_a_job_of_its_own(tmp_path: Path, run: Path) -> None:
    box = geomstore.Slice.box((-1, -1), (1, 1))
    spec = geomstore.ModelSpec(str(run / "step-10.pt2"))
    with geomstore.open(tmp_path / "s") as st:
        plain = geomstore.jobs.submit(st, spec, box, model="m")
        assert geomstore.jobs.submit(st, spec, box, model="m") == plain
        checked = geomstore.jobs.submit(st, spec, box, model="m", verify=True)
        assert checked != plain
        assert job_table(st).num_rows == 2


def test_a_queued_job_with_replace_replaces_the_stored_checkpoint(tmp_path: Path) -> None:
    box = geomstore.Slice.box((-1, -1), (1, 1))
    ckpt = tmp_path / "step-10.pt2"
    with geomstore.open(tmp_path / "s") as st:
        for seed, replace in ((1, False), (2, False), (2, True)):
            net = mlp((8,), 3, seed=seed)
            torch.export.save(torch.export.export(net, (torch.zeros(1, 2),)), str(ckpt))
            job = geomstore.jobs.submit(
                st, geomstore.ModelSpec(str(ckpt)), box, model="m", replace=replace
            )
            geomstore.Worker(st, device="cpu", max_attempts=1).run(once=True)
            row = job_table(st, job_id=job).to_pylist()[0]
            if seed == 2 and not replace:
                assert row["status"] == "failed" and "replace" in row["error"]
            else:
                assert row["status"] == "done"
                assert st.partitions(model="m").column("partition_id").to_pylist() == [
                    row["partition_id"]
                ]
