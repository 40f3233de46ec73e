"""The catalog listings and the one query layer: names, filters, NotFoundError, old spellings."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import geomstore
from geomstore.cli import app
from geomstore.errors import NotFoundError, StoreError
from geomstore.queries import (
    checkpoints,
    dataset_points,
    datasets,
    models,
    partitions,
    resolve_partitions,
    sample_boundary,
    slices,
)
from tests.nets import BOX, mlp

ROOT = Path(__file__).resolve().parents[1]
OTHER = geomstore.Slice.box((0.0, 0.0), (2.0, 1.0), name="other")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[geomstore.Store]:
    """Model "a": steps 0 and 10 on "box", step 10 on "other"; model "b": one checkpoint."""
    root = tmp_path_factory.mktemp("catalog") / "store"
    s = geomstore.open(root)
    net = mlp((6,), out=2)
    for step in (0, 10):
        s.add(
            geomstore.partition(net, BOX, device="cpu"), model="a", checkpoint=f"s{step}", step=step
        )
    s.add(geomstore.partition(net, OTHER, device="cpu"), model="a", checkpoint="s10", step=10)
    s.add(geomstore.partition(mlp((5,), seed=2), BOX, device="cpu"), model="b", checkpoint="only")
    s.add_points("pts", BOX, [[0.25, -0.5], [0.125, 0.75]], labels=[1, 0])
    yield s
    s.close()


def test_models_and_checkpoints(store: geomstore.Store) -> None:
    m = models(store).to_pylist()
    assert [(r["model"], r["n_checkpoints"], r["n_partitions"]) for r in m] == [
        ("a", 2, 3),
        ("b", 1, 1),
    ]
    assert json.loads(m[0]["input_shape"]) == [2] and m[0]["n_outputs"] == 2
    c = checkpoints(store, model="a").to_pylist()
    assert [(r["checkpoint"], r["step"], r["n_partitions"]) for r in c] == [
        ("s0", 0, 1),
        ("s10", 10, 2),
    ]
    assert checkpoints(store).num_rows == 3


def test_slices_and_datasets(store: geomstore.Store) -> None:
    sl = {r["slice"]: r for r in slices(store).to_pylist()}
    assert set(sl) == {"box", "other"}
    assert sl["box"]["n_partitions"] == 3 and sl["other"]["n_partitions"] == 1
    assert sl["box"]["slice_id"] == BOX.content_hash[:20]
    assert sl["other"]["domain"].startswith("POLYGON")
    d = datasets(store).to_pylist()
    assert [(r["dataset"], r["slice"], r["n_points"]) for r in d] == [("pts", "box", 2)]
    u, labels = dataset_points(store, dataset="pts", slice="box")
    assert u.dtype == np.float64 and u.tolist() == [[0.25, -0.5], [0.125, 0.75]]
    assert labels is not None and labels.tolist() == [1, 0]


def test_partitions_filters(store: geomstore.Store) -> None:
    every = partitions(store)
    assert every.num_rows == 4
    for col in ("partition_id", "model", "checkpoint", "step", "slice", "n_regions", "n_edges"):
        assert col in every.column_names
    a_box = partitions(store, model="a", slice="box").to_pylist()
    assert [(r["checkpoint"], r["step"]) for r in a_box] == [("s0", 0), ("s10", 10)]
    by_id = partitions(store, model="a", slice=OTHER.content_hash[:20])
    assert by_id.column("checkpoint").to_pylist() == ["s10"]
    some = partitions(store, model="a", checkpoints=["s10"])
    assert sorted(some.column("slice").to_pylist()) == ["box", "other"]
    assert store.partitions(model="b").equals(partitions(store, model="b"))
    n = store.sql(
        "SELECT count(*) AS n FROM regions WHERE partition_id = ?", [a_box[0]["partition_id"]]
    )
    assert n.table.column("n")[0].as_py() == a_box[0]["n_regions"]


@pytest.mark.parametrize(
    ("kwargs", "kind", "name"),
    [
        ({"model": "ghost"}, "model", "ghost"),
        ({"slice": "nowhere"}, "slice", "nowhere"),
        ({"model": "a", "checkpoints": ["s0", "s99"]}, "checkpoint", "s99"),
        ({"model": "b", "checkpoints": ["s0"]}, "checkpoint", "s0"),
    ],
)
def test_unknown_names_raise_not_found(
    store: geomstore.Store, kwargs: dict[str, object], kind: str, name: str
) -> None:
    with pytest.raises(NotFoundError) as info:
        partitions(store, **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert (err.kind, err.name) == (kind, name)
    assert isinstance(err, LookupError) and isinstance(err, StoreError)
    assert repr(name) in str(err) and "\n" not in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert (back.kind, back.name, str(back)) == (kind, name, str(err))


def test_query_layer_raises_not_found(store: geomstore.Store) -> None:
    with pytest.raises(NotFoundError, match=r"models in this store: \['a', 'b'\]") as info:
        resolve_partitions(store, model="ghost")
    assert info.value.kind == "model"
    with pytest.raises(StoreError, match="several slices"):
        resolve_partitions(store, model="a")
    with pytest.raises(NotFoundError, match=r"store\.partitions\(\) or geomstore partitions"):
        store.load_partition("0" * 20)
    with pytest.raises(NotFoundError) as info:
        store.load_slice("nowhere")
    assert info.value.kind == "slice"
    with pytest.raises(NotFoundError) as info:
        dataset_points(store, dataset="nope", slice="box")
    assert info.value.kind == "dataset"
    with pytest.raises(NotFoundError):
        checkpoints(store, model="ghost")


def test_reader_is_public_and_per_thread(store: geomstore.Store) -> None:
    import threading

    assert store.reader() is store.reader()
    assert store._reader() is store.reader()  # the old private name still answers
    other: list[object] = []
    t = threading.Thread(target=lambda: other.append(store.reader()))
    t.start()
    t.join()
    assert other[0] is not store.reader()
    row = store.reader().execute("SELECT count(*) FROM gs_partitions").fetchone()
    assert row == (4,)


def test_old_spellings_still_work_with_a_warning(store: geomstore.Store, tmp_path: Path) -> None:
    net = mlp((4,), out=2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with geomstore.open(tmp_path / "s") as s:
            rec = geomstore.Recorder(s, model_name="old", slices=[BOX])  # type: ignore[call-arg]
            ids = rec(model=net, step=0)  # type: ignore[call-arg]
            assert rec.model == "old" and rec.model_name == "old"
            assert s.partitions(model="old").column("partition_id").to_pylist() == ids
            s.add_points("p", slice_=BOX, x=[[0.0, 0.0]])  # type: ignore[call-arg]
            assert datasets(s).column("dataset").to_pylist() == ["p"]
        part = geomstore.partition(mlp((8,), out=3), BOX, device="cpu")
        old = sample_boundary(part.boundary, slice_=part.slice, n=4, seed=1)  # type: ignore[call-arg]
    new = sample_boundary(part.boundary, slice=part.slice, n=4, seed=1)
    assert old.equals(new)
    messages = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]
    assert any("model_name=" in m for m in messages)
    assert any("model=" in m and "net=" in m for m in messages)
    assert sum("slice_=" in m for m in messages) == 2
    with pytest.raises(TypeError, match="pass only slice="):
        sample_boundary(part.boundary, slice=part.slice, slice_=part.slice, n=1)  # type: ignore[call-arg]


def test_submit_takes_slice_and_the_old_sl(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "step-1.pt2"
    torch.export.save(torch.export.export(mlp((4,), out=2), (torch.zeros(1, 2),)), str(path))
    with geomstore.open(tmp_path / "s") as s:
        new = geomstore.submit(s, geomstore.ModelSpec(str(path)), slice=BOX, model="m")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            old = geomstore.submit(s, geomstore.ModelSpec(str(path)), sl=BOX, model="m")  # type: ignore[call-arg]
    assert old == new
    assert any("sl=" in str(x.message) for x in w if issubclass(x.category, DeprecationWarning))


def test_new_spellings_are_the_documented_ones(tmp_path: Path) -> None:
    net = mlp((4,), out=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with geomstore.open(tmp_path / "s") as s:
            rec = geomstore.Recorder(s, model="new", slices=[BOX])
            assert len(rec(net=net, step=0)) == 1
            s.add_points("p", slice=BOX, x=[[0.0, 0.0]])
    with pytest.raises(geomstore.errors.GeomstoreError, match="model's name"):
        geomstore.Recorder(geomstore.open(tmp_path / "t"), model=net, slices=[BOX])  # type: ignore[arg-type]


def test_cli_partitions_lists_and_filters(store: geomstore.Store) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["partitions", store.target, "--model", "a", "--slice", "box"])
    assert res.exit_code == 0, res.output
    assert "s0" in res.output and "s10" in res.output and "2 partition(s)" in res.output
    res = runner.invoke(app, ["partitions", store.target, "-m", "a", "-c", "s10", "-f", "json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert sorted(r["slice"] for r in rows) == ["box", "other"]
    assert {r["partition_id"] for r in rows} <= set(
        store.partitions().column("partition_id").to_pylist()
    )


def test_cli_partitions_unknown_model_is_one_line(store: geomstore.Store) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "geomstore", "partitions", store.target, "--model", "ghost"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert res.stderr.startswith("Error: no model 'ghost' in this store; models: ['a', 'b']")
    assert "Traceback" not in res.stderr


def test_partitions_command_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "geomstore partitions" in readme
