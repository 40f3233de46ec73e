"""Regression tests of a researcher's review of local complexity and churn: the density
counts the units' zero sets, not the slice's border; a neighbourhood outside the domain has
no counts and a point there no region (Python, the gs_lc macro, HTTP); churn across an
architecture change compares labels, not patterns of different layers."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import shapely
import torch
from fastapi.testclient import TestClient
from torch import nn

import geomstore
from geomstore.errors import SQLError
from geomstore.queries import (
    CompareArgumentError,
    churn,
    lc_trajectory,
    local_complexity,
    point_regions,
    resolve_partitions,
)
from geomstore.service import ServiceConfig, create_app
from tests.nets import BOX, mlp
from tests.test_commands import ok

R = 0.1
#: (point, n_neurons, n_regions, disk density) for ``_line`` on the box: the zero set
#: ``u0 = 0`` through the middle, near the top border, a disk reaching in from outside,
#: one that misses the box (None: no counts). The density divides by the whole disk.
LINE_CASES = [
    ((0.0, 0.0), 1, 2, 2 * R / (math.pi * R * R)),
    ((0.0, 0.95), 1, 2, 0.15 / (math.pi * R * R)),  # the line runs from 0.85 to the border
    ((0.5, 0.95), 0, 1, 0.0),  # only the border in the disk
    ((1.05, 0.3), 0, 1, 0.0),  # the centre outside, the disk reaching in
    ((1.2, 0.0), None, None, None),
    ((50.0, 50.0), None, None, None),
]
SHAPES = ("disk", "diamond")


def _line() -> nn.Sequential:
    """One hidden ReLU, zero on the line ``u0 = 0``: two regions on the box."""
    net = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[2].bias.copy_(torch.tensor([0.0, 0.3]))
    return net.eval()


def _flat() -> nn.Sequential:
    """Every ReLU active on the whole box: one region, no zero set on the slice."""
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0]]))
        net[0].bias.fill_(5.0)
    return net.eval()


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Models ``line`` and ``flat`` (box), ``relu`` (the box (-2,-1.5)-(3,2), two
    checkpoints), ``arch`` (2-16-16-2 at steps 0/50/100, 2-32-32-2 at 150/200/250, data set
    ``moons``) and ``outs`` (2 then 3 outputs)."""
    target = tmp_path_factory.mktemp("lc-review") / "store"
    wide = geomstore.Slice.box((-2.0, -1.5), (3.0, 2.0), name="wide")
    with geomstore.open(target) as st:
        st.add(geomstore.partition(_line(), BOX, device="cpu"), model="line", checkpoint="c")
        st.add(geomstore.partition(_flat(), BOX, device="cpu"), model="flat", checkpoint="c")
        for seed, step in enumerate((0, 300)):
            part = geomstore.partition(mlp((16, 16), 2, seed=seed), wide, device="cpu")
            st.add(part, model="relu", checkpoint=f"step-{step}", step=step)
        for step in (0, 50, 100, 150, 200, 250):
            width = 16 if step < 150 else 32
            part = geomstore.partition(mlp((width, width), 2, seed=step), BOX, device="cpu")
            st.add(part, model="arch", checkpoint=f"step-{step}", step=step)
        for step, k in enumerate((2, 3)):
            part = geomstore.partition(mlp((8,), k, seed=step), BOX, device="cpu")
            st.add(part, model="outs", checkpoint=f"k{k}", step=step)
        rng = np.random.default_rng(0)
        st.add_points("moons", BOX, rng.uniform(-1, 1, (30, 2)), split="train")
    return str(target)


@pytest.fixture(scope="module")
def store(path: str) -> Iterator[geomstore.Store]:
    with geomstore.open(path, read_only=True) as st:
        yield st


@pytest.fixture(scope="module")
def http(path: str) -> Iterator[TestClient]:
    with TestClient(create_app(ServiceConfig(store=path))) as c:
        yield c


def _pid(store: geomstore.Store, model: str, checkpoint: str = "c") -> str:
    parts = resolve_partitions(store, model=model, checkpoints=[checkpoint])
    return str(parts.column("partition_id")[0].as_py())


def _gs_lc(store: geomstore.Store, pid: str, p: tuple[float, float], r: float) -> dict:
    q = "SELECT * FROM gs_lc(?, ?, ?, ?)"
    rows = store.sql(q, [pid, float(p[0]), float(p[1]), float(r)]).table.to_pylist()
    assert len(rows) == 1
    return rows[0]


def _shapely_lc(
    store: geomstore.Store, pid: str, u: np.ndarray, r: float, shape: str
) -> list[tuple[int | None, int | None, float | None]]:
    """(n_neurons, n_regions, density) by shapely: the neurons' edges only, over the whole
    neighbourhood's area; None where the neighbourhood misses the domain."""
    part = store.load_partition(pid)
    e = part.edges.to_pydict()
    ends = [np.stack([e["u0_a"], e["u1_a"]], 1), np.stack([e["u0_b"], e["u1_b"]], 1)]
    segs = shapely.linestrings(np.stack(ends, 1))
    neuron = np.array([x is not None for x in e["layer"]])
    domain = shapely.Polygon(part.slice.domain)
    out: list[tuple[int | None, int | None, float | None]] = []
    for x, y in u:
        if shape == "disk":
            hood = shapely.Point(x, y).buffer(r, quad_segs=512)
            area = math.pi * r * r
        else:
            hood = shapely.Polygon([(x + r, y), (x, y + r), (x - r, y), (x, y - r)])
            area = 2 * r * r
        if shapely.intersection(hood, domain).area == 0:
            out.append((None, None, None))
            continue
        lens = shapely.length(shapely.intersection(segs, hood))
        met = (lens > 0) & neuron
        units = {(e["layer"][i], e["neuron"][i]) for i in np.flatnonzero(met)}
        regions = int(shapely.intersects(part.polygons(), hood).sum())
        out.append((len(units), regions, float(lens[neuron].sum() / area)))
    return out


def _triples(table: object) -> list[tuple[int | None, int | None, float | None]]:
    rows = table.to_pylist()  # type: ignore[attr-defined]
    return [(r["n_neurons"], r["n_regions"], r["boundary_density"]) for r in rows]


def _same(
    got: list[tuple[int | None, int | None, float | None]],
    want: list[tuple[int | None, int | None, float | None]],
    rtol: float,
) -> None:
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] is None for g in got] == [w[2] is None for w in want]
    dens = [(g[2], w[2]) for g, w in zip(got, want, strict=True) if w[2] is not None]
    np.testing.assert_allclose([d[0] for d in dens], [d[1] for d in dens], rtol=rtol, atol=1e-9)


# 1. the density counts neuron boundaries, not the slice's border ----------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_density_counts_the_zero_sets_not_the_border(store: geomstore.Store, shape: str) -> None:
    u = np.array([c[0] for c in LINE_CASES])
    got = _triples(local_complexity(store, model="line", points=u, radius=R, shape=shape))
    area = math.pi * R * R if shape == "disk" else 2 * R * R
    want = [(n, k, None if d is None else d * math.pi * R * R / area) for _, n, k, d in LINE_CASES]
    if shape == "diamond":  # the diamond holds 2r of the line at the centre, as the disk
        want[0] = (1, 2, 2 * R / area)
    _same(got, want, rtol=1e-12)
    # one region, no zero set: no density anywhere, also along the border and its corners
    corners = np.array([[0.97, 0.97], [-0.99, 0.0], [1.0, 1.0], [0.0, 0.0]])
    flat = local_complexity(store, model="flat", points=corners, radius=R, shape=shape)
    assert _triples(flat) == [(0, 1, 0.0)] * 4


def test_the_review_example(store: geomstore.Store) -> None:
    """The reported case: n_neurons 0 at (2.95, 1.95) but density 8.6964, the border's
    length in the disk over pi r^2."""
    u = np.array([[-1.95, 0.3], [2.95, 1.95], [50.0, 50.0]])
    lc = local_complexity(store, model="relu", points=u, radius=R, checkpoints=["step-300"])
    rows = lc.to_pylist()
    assert rows[1]["n_neurons"] == 0 and rows[1]["boundary_density"] == 0.0
    want = _shapely_lc(store, _pid(store, "relu", "step-300"), u, R, "disk")
    _same(_triples(lc), want, rtol=1e-4)  # the shapely disk is a polygon


@pytest.mark.parametrize("shape", SHAPES)
def test_lc_matches_shapely_near_and_beyond_the_border(store: geomstore.Store, shape: str) -> None:
    rng = np.random.default_rng(3)
    u = np.vstack([rng.uniform(-2.3, 3.3, (40, 2)), [[3.05, 2.05], [-2.2, 0.0], [9.0, 9.0]]])
    pid = _pid(store, "relu", "step-0")
    lc = local_complexity(store, model="relu", points=u, radius=0.25, shape=shape)
    got = _triples(lc)[: len(u)]  # step-0 first
    want = _shapely_lc(store, pid, u, 0.25, shape)
    _same(got, want, rtol=1e-4 if shape == "disk" else 1e-9)
    assert {w[0] is None for w in want} == {True, False}
    assert any(w[2] and w[2] > 0 for w in want)


def test_gs_lc_agrees_with_local_complexity(store: geomstore.Store) -> None:
    rng = np.random.default_rng(5)
    u = np.vstack([[c[0] for c in LINE_CASES][:4], rng.uniform(-2.3, 3.3, (25, 2))])
    for model, checkpoint in (("line", "c"), ("relu", "step-300")):
        pid = _pid(store, model, checkpoint)
        for r in (0.1, 0.4):
            lc = local_complexity(store, model=model, points=u, radius=r, checkpoints=[checkpoint])
            macro = [_gs_lc(store, pid, (float(x), float(y)), r) for x, y in u]
            _same(_triples(lc), [tuple(m.values()) for m in macro], rtol=1e-12)  # type: ignore[misc]
    line = _pid(store, "line")
    for p, n, k, d in LINE_CASES:
        g = _gs_lc(store, line, p, R)
        assert (g["n_neurons"], g["n_regions"]) == (n, k)
        if d is None:
            assert g["boundary_density"] is None
        else:
            assert g["boundary_density"] == pytest.approx(d, rel=1e-12, abs=1e-12)


def test_trajectory_density_is_the_mean_of_the_zero_sets_density(store: geomstore.Store) -> None:
    u = np.array([c[0] for c in LINE_CASES[:4]])
    table, _ = lc_trajectory(store, model="line", points=u, radius=R)
    row = table.to_pylist()[0]
    assert row["n_points"] == 4
    assert row["density_mean"] == pytest.approx(np.mean([c[3] for c in LINE_CASES[:4]]))
    flat, _ = lc_trajectory(store, model="flat", points=u, radius=R)
    assert flat.column("density_mean").to_pylist() == [0.0]


# 2. points outside the domain ---------------------------------------------------------------
def test_a_neighbourhood_off_the_domain_has_no_counts(store: geomstore.Store) -> None:
    u = np.array([[0.0, 0.0], [50.0, 50.0], [1.05, 0.0]])
    for layers in ("hidden", "all"):
        rows = local_complexity(store, model="line", points=u, radius=R, layers=layers).to_pylist()
        far = rows[1]
        assert far["point_id"] == 1
        assert [far[c] for c in ("n_neurons", "neurons_per_layer", "n_regions")] == [None] * 3
        assert far["boundary_density"] is None
        assert rows[0]["n_neurons"] == (1 if layers == "hidden" else 2)
        assert (rows[2]["n_neurons"], rows[2]["n_regions"]) == (0, 1)
    # the trajectory averages the points it has counts for, and says how many
    table, _ = lc_trajectory(store, model="line", points=u, radius=R)
    row = table.to_pylist()[0]
    assert (row["n_points"], row["lc_mean"]) == (2, 0.5)
    table, turns = lc_trajectory(store, model="line", points=u[1:2], radius=R)
    row = table.to_pylist()[0]
    assert row["n_points"] == 0 and row["lc_mean"] is None and row["density_mean"] is None
    assert turns["all"]["peak"] is None


def test_gs_lc_refuses_an_unknown_partition_and_a_bad_radius(store: geomstore.Store) -> None:
    pid = _pid(store, "line")
    assert _gs_lc(store, pid, (50.0, 50.0), R) == {
        "n_neurons": None,
        "n_regions": None,
        "boundary_density": None,
    }
    with pytest.raises(SQLError, match=r"gs_lc: no partition 'nonexistent-id' in this store\."):
        _gs_lc(store, "nonexistent-id", (0.0, 0.0), R)
    for r in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(SQLError, match="gs_lc: the radius r must be a finite number > 0"):
            _gs_lc(store, pid, (0.0, 0.0), r)
    with pytest.raises(SQLError, match="got NULL"):
        store.sql("SELECT * FROM gs_lc(?, 0, 0, NULL)", [pid])


def test_point_regions_keeps_every_point(store: geomstore.Store) -> None:
    u = np.array([[-0.5, 0.0], [50.0, 50.0], [0.5, 0.2], [1.0, 0.0]])
    for affine in (False, True):
        t = point_regions(store, model="arch", points=u, affine=affine)
        n_ck = 6
        assert t.num_rows == n_ck * len(u)
        assert t.column("point_id").to_pylist() == list(range(len(u))) * n_ck
        rows = [r for r in t.to_pylist() if r["point_id"] == 1]
        nulls = ["region_id", "label", "pattern", "distance_to_border", "distance_to_boundary"]
        if affine:
            nulls += ["A", "c", "pattern_hash"]
            assert all(r["partition_id"] for r in rows)
        assert all(r[c] is None for r in rows for c in nulls)
        held = [r for r in t.to_pylist() if r["point_id"] != 1]
        assert all(r["region_id"] is not None and r["label"] is not None for r in held)
    # churn compares the points that lie in a region
    ch = churn(store, model="arch", points=u, checkpoints=["step-0", "step-50"]).to_pylist()
    assert ch[0]["n_points"] == 3


def test_the_service_agrees(store: geomstore.Store, http: TestClient) -> None:
    pts = [list(c[0]) for c in LINE_CASES]
    resp = http.post("/api/lc", json={"model": "line", "points": pts, "radius": R})
    assert resp.status_code == 200, resp.text
    rows = resp.json()["rows"]
    want = _triples(local_complexity(store, model="line", points=np.array(pts), radius=R))
    assert [(r["n_neurons"], r["n_regions"], r["boundary_density"]) for r in rows] == want
    assert rows[-1]["n_neurons"] is None and rows[2]["boundary_density"] == 0.0
    resp = http.post("/api/points/regions", json={"model": "line", "points": pts})
    assert resp.status_code == 200, resp.text
    regions = [r["region_id"] for r in resp.json()["rows"]]
    assert len(regions) == len(pts) and regions[-2:] == [None, None]
    resp = http.post("/api/sql", json={"sql": "SELECT * FROM gs_lc('nonexistent-id', 0, 0, 1)"})
    assert resp.status_code == 400, resp.text
    assert "gs_lc: no partition 'nonexistent-id'" in resp.json()["error"]["message"]


# 3. churn across an architecture change ------------------------------------------------------
def test_churn_across_an_architecture_change(store: geomstore.Store, path: str) -> None:
    rows = churn(store, model="arch", points="moons").to_pylist()
    assert [(r["previous"], r["checkpoint"]) for r in rows][2] == ("step-100", "step-150")
    for r in rows:
        assert r["n_points"] == 30 and 0 <= r["label_churn"] <= 1
        if r["checkpoint"] == "step-150":
            assert r["pattern_churn"] is None  # 32-bit against 64-bit patterns: no meaning
        else:
            assert 0 <= r["pattern_churn"] <= 1
    # the labels are compared as agreement_over compares the classes
    labels = point_regions(store, model="arch", points="moons").to_pylist()
    a = [r["label"] for r in labels if r["checkpoint"] == "step-100"]
    b = [r["label"] for r in labels if r["checkpoint"] == "step-150"]
    assert rows[2]["label_churn"] == np.mean(np.array(a) != np.array(b))
    # a local-complexity tally across the change refuses, as before, as an argument error
    with pytest.raises(ValueError, match="models with different layers"):
        lc_trajectory(store, model="arch", points="moons", radius=R)
    out = ok("compare", path, "-m", "arch", "--points", "moons", "--format", "json")
    assert "step-150" in out


def test_churn_refuses_a_change_of_outputs(store: geomstore.Store) -> None:
    with pytest.raises(CompareArgumentError, match="have 2 and 3 outputs"):
        churn(store, model="outs", points="moons")
    # the regions at points are still found, each label from its own checkpoint's outputs
    t = point_regions(store, model="outs", points="moons")
    for k in (2, 3):
        labels = [r["label"] for r in t.to_pylist() if r["checkpoint"] == f"k{k}"]
        net = mlp((8,), k, seed=k - 2).double()
        x = store.sql("SELECT u0, u1 FROM points ORDER BY split, point_id").table
        u = np.stack([x.column("u0").to_numpy(), x.column("u1").to_numpy()], 1)
        with torch.no_grad():
            want = net(torch.from_numpy(u)).argmax(1).numpy()
        assert labels == want.tolist()


def test_the_service_answers_churn_and_refusals_with_4xx(http: TestClient) -> None:
    resp = http.post("/api/compare/churn", json={"model": "arch", "dataset": "moons"})
    assert resp.status_code == 200, resp.text
    rows = resp.json()["rows"]
    assert [r["pattern_churn"] is None for r in rows] == [False, False, True, False, False]
    body = {"model": "arch", "dataset": "moons", "radius": R}
    resp = http.post("/api/lc/trajectory", json=body)
    assert resp.status_code == 400, resp.text
    assert "different layers" in resp.json()["error"]["message"]
    resp = http.post("/api/compare/churn", json={"model": "outs", "dataset": "moons"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "CompareArgumentError"
    assert json.dumps(resp.json()).count("outputs") >= 1
