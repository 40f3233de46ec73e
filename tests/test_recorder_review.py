"""What a researcher following a training run ran into: a second run recorded through the
queue under a stored name, the worker's handling of that conflict, and the layer index
of each nonlinearity in a partition's model summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import geomstore
from geomstore.errors import CheckpointConflictError
from geomstore.jobs import job_table, submit
from geomstore.loading import ModelSpec
from geomstore.worker import Worker
from tests.nets import BOX, mlp


def _steps(rec: geomstore.Recorder, net: torch.nn.Module, steps: range, seed: float) -> None:
    for step in steps:
        rec(net, step, {"seed": seed})


def test_a_second_run_through_the_queue_is_refused_before_it_overwrites(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    run1, run2 = mlp((8,), 2, seed=1), mlp((8,), 2, seed=2)
    with geomstore.open(tmp_path / "s") as st:
        rec = geomstore.Recorder(st, "run", [BOX], every=10, queue=True, folder=folder)
        _steps(rec, run1, range(0, 30, 10), 1.0)
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        # the same weights again (a resumed run re-recording): the same jobs, files kept
        _steps(rec, run1, range(0, 30, 10), 1.0)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        assert job_table(st).num_rows == 3
        # other weights under the queued names: refused, nothing written (no worker ran yet)
        with pytest.raises(CheckpointConflictError, match=r"queued as .*step-0\.pt2.*nothing was"):
            rec(run2, 0, {"seed": 2.0})
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        assert Worker(st, device="cpu").run(once=True)["done"] == 3
        # stored now: still refused, by the stored weights
        folder2 = tmp_path / "ck2"
        rec2 = geomstore.Recorder(st, "run", [BOX], every=10, queue=True, folder=folder2)
        with pytest.raises(CheckpointConflictError, match="'step-10' of model 'run' is stored"):
            rec2(run2, 10, {"seed": 2.0})
        assert not (folder2 / "step-10.pt2").exists()
        metrics = st.sql("SELECT metrics FROM gs_partitions").table.column(0).to_pylist()
        assert all(json.loads(m)["seed"] == 1.0 for m in metrics)
        # replace=True: the new run's checkpoint replaces the old one
        rec3 = geomstore.Recorder(
            st, "run", [BOX], every=10, queue=True, folder=folder, replace=True
        )
        rec3(run2, 10, {"seed": 2.0})
        assert Worker(st, device="cpu").run(once=True)["done"] == 1
        got = st.sql("SELECT checkpoint, metrics FROM gs_partitions ORDER BY step").table
    seeds = [json.loads(m)["seed"] for m in got.column("metrics").to_pylist()]
    assert got.column("checkpoint").to_pylist() == ["step-0", "step-10", "step-20"]
    assert seeds == [1.0, 2.0, 1.0]


def test_a_local_run_then_the_queue_with_the_same_weights_is_no_conflict(tmp_path: Path) -> None:
    net = mlp((8,), 2, seed=4)
    with geomstore.open(tmp_path / "s") as st:
        geomstore.Recorder(st, "r", [BOX], every=1)(net, 3)
        queued = geomstore.Recorder(st, "r", [BOX], every=1, queue=True, folder=tmp_path / "f")
        queued(net, 3)  # the stored weights: same hash through the exported program
        with pytest.raises(CheckpointConflictError):
            queued(mlp((8,), 2, seed=5), 3)


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_a_job_that_conflicts_with_a_stored_checkpoint_fails_at_once(tmp_path: Path) -> None:
    with geomstore.open(tmp_path / "s") as st:
        st.add(
            geomstore.partition(mlp((8,), 2, seed=1), BOX, device="cpu"), model="m", checkpoint="c"
        )
        f = tmp_path / "other.pt2"
        torch.export.save(torch.export.export(mlp((8,), 2, seed=2), (torch.zeros(1, 2),)), f)
        submit(st, ModelSpec(str(f)), BOX, model="m", checkpoint="c")
        counts = Worker(st, device="cpu").run(once=True)
        (job,) = job_table(st).to_pylist()
    assert counts["failed"] == 1 and counts["retry"] == 0
    assert job["attempts"] == 1 and "CheckpointConflictError" in job["error"]


def test_the_layers_of_a_summary_are_numbered_as_the_edges_are() -> None:
    torch.manual_seed(1)  # every layer's units cross the box
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 6),
        torch.nn.ReLU(),
        torch.nn.Linear(6, 6),
        torch.nn.LeakyReLU(),
        torch.nn.Linear(6, 6),
        torch.nn.ReLU(),
        torch.nn.Linear(6, 1),
    ).eval()
    part = geomstore.partition(net, BOX, device="cpu")
    layers = [lay["layer"] for lay in part.model_summary["layers"]]
    assert layers == [0, 1, 2]
    on_edges = {v for v in part.edges.column("layer").to_pylist() if v is not None}
    assert on_edges <= set(layers) and len(on_edges) == 3
    offsets = [lay["unit_offset"] for lay in part.model_summary["layers"]]
    assert offsets == [0, 6, 12]


@pytest.mark.parametrize("bad", [1.5, -1, True, "3"])
def test_a_recorder_step_must_be_a_whole_number(tmp_path: Path, bad: object) -> None:
    with geomstore.open(tmp_path / "s") as st:
        rec = geomstore.Recorder(st, "r", [BOX], every=1)
        with pytest.raises(geomstore.GeomstoreError, match="step must be a whole number"):
            rec(mlp((4,), 1), bad)  # type: ignore[arg-type]
        assert rec(mlp((4,), 1), torch.tensor(2))  # a 0-d integer tensor is a step


def test_slices_made_without_a_name_are_stored_under_one(tmp_path: Path) -> None:
    box = geomstore.Slice.box((-1, -1), (1, 0.5))
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)).numpy()
    plane = geomstore.Slice.through(*x)
    assert box.name == "box(-1,-1,1,0.5)"
    assert plane.name == f"plane-{plane.content_hash[:8]}"
    assert geomstore.Slice.through(*x, name="mine").name == "mine"
    with geomstore.open(tmp_path / "s") as st:
        st.add(geomstore.partition(mlp((6,), 1), box, device="cpu"), model="m", checkpoint="c")
        assert st.load_slice("box(-1,-1,1,0.5)") == box
        assert st.partitions().column("slice").to_pylist() == ["box(-1,-1,1,0.5)"]
