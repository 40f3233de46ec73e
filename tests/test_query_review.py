"""Regression tests of a new-user review of the query layer: typed per-checkpoint tables,
empty boundary samples, comparisons of fewer than two checkpoints, unknown data sets, and
error hints that name what exists (Python, CLI and HTTP)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

import geomstore
from geomstore import queries
from geomstore.errors import GeomstoreError, NotFoundError, StoreError
from geomstore.queries import (
    CompareArgumentError,
    NoBoundaryError,
    agreement,
    agreement_over,
    boundary_samples,
    churn,
    dataset_points,
    lc_trajectory,
    local_complexity,
    migration_index,
    partition_stats,
    partitions,
    point_regions,
    resolve_partitions,
    sample_boundary,
)
from geomstore.queries.agreement import SCHEMA
from geomstore.service import ServiceConfig, create_app
from tests.nets import BOX
from tests.test_cli_fixes import fail
from tests.test_commands import ok
from tests.test_queries_fixes import _split_box  # off the box when |shift| > 1: no boundary

WIDE = geomstore.Slice.box((-2.0, -2.0), (2.0, 2.0), name="wide")


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Model ``m``: ``flat`` (no decision boundary), ``cut`` and ``cut2`` on the box, no
    metrics; model ``two``: one checkpoint on the box and on ``wide``. Data set ``pts`` on
    the box, ``far`` on ``wide`` only."""
    target = tmp_path_factory.mktemp("review") / "store"
    with geomstore.open(target) as st:
        for step, (name, shift) in enumerate((("flat", -5.0), ("cut", 0.1), ("cut2", -0.2))):
            part = geomstore.partition(_split_box(shift), BOX, device="cpu")
            assert (part.boundary.num_rows == 0) == (name == "flat")
            st.add(part, model="m", checkpoint=name, step=step)
        for sl in (BOX, WIDE):
            st.add(
                geomstore.partition(_split_box(0.1), sl, device="cpu"), model="two", checkpoint="c"
            )
        rng = np.random.default_rng(0)
        st.add_points("pts", BOX, rng.uniform(-1, 1, (12, 2)))
        st.add_points("far", WIDE, rng.uniform(-2, 2, (5, 2)))
    return str(target)


@pytest.fixture(scope="module")
def store(path: str) -> Iterator[geomstore.Store]:
    with geomstore.open(path, read_only=True) as st:
        yield st


@pytest.fixture(scope="module")
def http(path: str) -> Iterator[TestClient]:
    with TestClient(create_app(ServiceConfig(store=path))) as c:
        yield c


def _part(store: geomstore.Store, checkpoint: str) -> geomstore.Partition:
    pid = resolve_partitions(store, model="m", checkpoints=[checkpoint])["partition_id"][0]
    return store.load_partition(pid.as_py())


# 1. per-checkpoint tables share one typed schema -----------------------------------------
def test_agreement_over_checkpoints_with_and_without_a_boundary(
    store: geomstore.Store, path: str, http: TestClient
) -> None:
    table = agreement_over(store, model="m")
    assert agreement(_part(store, "flat"), _part(store, "cut")).schema == SCHEMA
    assert table.schema.field("hausdorff").type == pa.float64()
    assert table.schema.field("mean_distance").type == pa.float64()
    totals = [r for r in table.to_pylist() if r["class"] is None]
    assert [(r["previous"], r["checkpoint"]) for r in totals] == [("flat", "cut"), ("cut", "cut2")]
    assert totals[0]["hausdorff"] is None  # no boundary at flat: no movement to measure
    np.testing.assert_allclose(totals[1]["hausdorff"], 0.3, atol=1e-3)
    resp = http.post("/api/compare", json={"model": "m"})
    assert resp.status_code == 200, resp.text
    assert "cut2" in ok("compare", path, "-m", "m")


def test_other_query_tables_keep_their_types_when_a_column_is_all_null(
    store: geomstore.Store,
) -> None:
    # one region, no boundary, no metrics: edge_length, share and metrics are all null
    stats = partition_stats(store, model="m", checkpoints=["flat"])
    assert stats.schema.field("edge_length").type == pa.float64()
    assert stats.schema.field("metrics").type == pa.string()
    mig = migration_index(store, model="m", distance=0.1, checkpoints=["flat"])
    assert mig.schema.field("share").type == pa.float64()
    traj, _ = lc_trajectory(store, model="m", points="pts", radius=0.1)
    assert traj.schema.field("metrics").type == pa.string()


# 2. boundary samples of nothing: an empty table with the usual columns -------------------
def test_boundary_samples_without_boundary_or_with_n_0(
    store: geomstore.Store, path: str, http: TestClient
) -> None:
    cut, flat = _part(store, "cut"), _part(store, "flat")
    some = sample_boundary(cut.boundary, cut.slice, 3)
    for boundary, n in ((cut.boundary, 0), (flat.boundary, 0)):
        empty = sample_boundary(boundary, cut.slice, n)
        assert empty.num_rows == 0 and empty.schema == some.schema
    with pytest.raises(NoBoundaryError, match="there is none on this slice"):
        sample_boundary(flat.boundary, flat.slice, 2)
    want = boundary_samples(store, model="m", n=2).schema
    for n, ckpts in ((2, ["flat"]), (0, ["flat"]), (0, None)):
        got = boundary_samples(store, model="m", n=n, checkpoints=ckpts)
        assert got.num_rows == 0 and got.schema == want
    for body in ({"checkpoints": ["flat"]}, {"n": 0}):
        resp = http.post("/api/boundary/samples", json={"model": "m", **body})
        assert resp.status_code == 200, resp.text
        assert resp.json()["rows"] == []
    assert "0 decision-boundary samples" in ok("sample", path, "-m", "m", "-n", "2", "-c", "flat")
    assert "0 decision-boundary samples" in ok("sample", path, "-m", "m", "-n", "0")


# 3. comparing needs two checkpoints --------------------------------------------------------
def test_compare_needs_two_checkpoints(store: geomstore.Store, path: str, http: TestClient) -> None:
    line = (
        "compare needs at least two checkpoints; got 1 (cut): name two or more with "
        "checkpoints= (-c/--checkpoint on the command line), or leave it out to compare "
        "them all."
    )
    for fn in (agreement_over, churn):
        kw = {"points": "pts"} if fn is churn else {}
        with pytest.raises(CompareArgumentError) as info:
            fn(store, model="m", checkpoints=["cut"], **kw)
        assert str(info.value) == line
        assert isinstance(info.value, ValueError) and isinstance(info.value, GeomstoreError)
    with pytest.raises(CompareArgumentError, match=r"model 'two' has 1 \(c\) on this slice"):
        agreement_over(store, model="two", slice="box")
    for url, extra in (("/api/compare", {}), ("/api/compare/churn", {"dataset": "pts"})):
        resp = http.post(url, json={"model": "m", "checkpoints": ["cut"], **extra})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["type"] == "CompareArgumentError"
        assert resp.json()["error"]["message"] == line
    assert fail("compare", path, "-m", "m", "-c", "cut") == f"Error: {line}"


# 4. an unknown data set is a NotFoundError listing the data sets of the slice -------------
def test_unknown_data_set_is_not_found(store: geomstore.Store, path: str, http: TestClient) -> None:
    line = (
        "no stored points of data set 'moon' on slice 'box'; data sets on this slice: "
        "['pts'] (add points with store.add_points(name, slice, x))."
    )
    calls = [
        lambda: local_complexity(store, model="m", points="moon", radius=0.1),
        lambda: lc_trajectory(store, model="m", points="moon", radius=0.1),
        lambda: point_regions(store, model="m", points="moon"),
        lambda: churn(store, model="m", points="moon"),
        lambda: dataset_points(store, dataset="moon", slice="box"),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as info:
            call()
        assert (info.value.kind, info.value.name, str(info.value)) == ("dataset", "moon", line)
    with pytest.raises(NotFoundError, match=r"'far' on slice 'box' \(it is on slice\(s\) \['wide'"):
        local_complexity(store, model="m", points="far", radius=0.1)
    for url, body in (
        ("/api/lc", {"radius": 0.1}),
        ("/api/lc/trajectory", {"radius": 0.1}),
        ("/api/points/regions", {}),
        ("/api/compare/churn", {}),
    ):
        resp = http.post(url, json={"model": "m", "dataset": "moon", **body})
        assert resp.status_code == 404, (url, resp.text)
        error = resp.json()["error"]
        assert (error["kind"], error["name"], error["message"]) == ("dataset", "moon", line)
    # a request with another error too: the service's own check names the slice's data sets
    body = {"model": "m", "checkpoints": ["cut"], "dataset": "moon"}
    resp = http.post("/api/compare/churn", json=body)
    assert resp.status_code == 404 and resp.json()["error"]["message"] == line
    assert fail("lc", path, "-m", "m", "--points", "moon", "-r", "0.1") == f"Error: {line}"
    assert fail("compare", path, "-m", "m", "--points", "moon") == f"Error: {line}"


# 5. hints name what exists, in both spellings, with the choices ---------------------------
def test_hints_name_what_exists(store: geomstore.Store, path: str) -> None:
    with pytest.raises(NotFoundError) as info:
        partitions(store, model="m", checkpoints=["nosuch"])
    missing = str(info.value)
    assert "checkpoints: cut, cut2, flat" in missing
    assert "geomstore.queries.checkpoints(store, model=...)" in missing
    assert "store.checkpoints(" not in missing.replace("queries.checkpoints(store", "")
    assert callable(queries.checkpoints) and not hasattr(geomstore.Store, "checkpoints")
    assert fail("stats", path, "-m", "m", "-c", "nosuch") == f"Error: {missing}"

    with pytest.raises(StoreError) as info:
        partition_stats(store, model="two")
    several = str(info.value)
    assert several == (
        "model 'two' has partitions on several slices; pass slice= (--slice on the command "
        "line); its slices: box, wide."
    )
    assert fail("stats", path, "-m", "two") == f"Error: {several}"

    with pytest.raises(NoBoundaryError) as info:
        boundary_samples(store, model="m", n=2, pair=(0, 7))
    pair = str(info.value)
    assert pair == (
        "no decision boundary matches the request (none between classes 0 and 7); choose "
        "another pair= (--classes on the command line) or drop it; class pairs on the "
        "boundary: 0,1."
    )
    assert fail("sample", path, "-m", "m", "--classes", "0,7") == f"Error: {pair}"
    with pytest.raises(NoBoundaryError, match=r"within 0.1 of the near= points\); widen within="):
        boundary_samples(store, model="m", n=2, near=np.array([[9.0, 9.0]]), within=0.1)
