"""Regression tests of the query layer: labels at points, near-sampling, class pairs over
checkpoints, the gs_lc macro, inputs projected onto the slice, turning points."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from torch import nn

import geomstore
from geomstore.queries import (
    NoBoundaryError,
    boundary_samples,
    churn,
    local_complexity,
    point_regions,
    sample_boundary,
    turning_points,
)
from geomstore.queries.boundary import _near_intervals
from tests.nets import BOX, mlp


def _split_box(shift: float) -> nn.Sequential:
    """One region on the box (every ReLU active); logits ``u0 + 5`` and ``-u0 + 5 + 2 shift``
    tie on ``u0 = shift``, so the decision boundary cuts the region in two."""
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0]]))
        net[0].bias.fill_(5.0)
        net[2].weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        net[2].bias.copy_(torch.tensor([0.0, 2 * shift]))
    return net.eval()


def _predict(net: nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's own class at inputs x (float64) and its top-two margin."""
    with torch.no_grad():
        out = net.double()(torch.from_numpy(x)).numpy()
    net.float()
    top = np.sort(out, axis=1)
    return out.argmax(1), top[:, -1] - top[:, -2]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[geomstore.Store]:
    with geomstore.open(tmp_path / "s") as s:
        yield s


# 1. the label at a point is the predicted class there ------------------------------------
def test_label_is_the_predicted_class_at_the_point(store: geomstore.Store) -> None:
    for step, shift in enumerate((0.15, -0.15)):
        part = geomstore.partition(_split_box(shift), BOX, device="cpu")
        assert part.regions.num_rows == 1
        store.add(part, model="m", checkpoint=f"c{step}", step=step)
    u = np.array([[0.5, 0.0], [-0.5, 0.3], [0.1, -0.2], [-0.1, 0.7]])
    rows = point_regions(store, model="m", points=u).to_pylist()
    # c0 ties on u0 = 0.15, c1 on u0 = -0.15: class 0 right of the tie, class 1 left
    assert [r["label"] for r in rows] == [0, 1, 1, 1, 0, 1, 0, 0]
    assert {r["region_id"] for r in rows} == {0}
    ch = churn(store, model="m", points=u).to_pylist()
    assert ch[0]["label_churn"] == 0.5  # the points with |u0| < 0.15 change class
    assert ch[0]["pattern_churn"] == 0.0


def test_label_of_a_one_output_model_uses_the_threshold(store: geomstore.Store) -> None:
    net = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0]]))
        net[0].bias.fill_(5.0)
        net[2].weight.fill_(1.0)
        net[2].bias.fill_(-5.0)  # out = u0 on the box, one region
    part = geomstore.partition(net.eval(), BOX, device="cpu", threshold=0.3)
    store.add(part, model="one", checkpoint="c", step=0)
    u = np.array([[0.5, 0.0], [0.0, 0.0], [0.31, 0.9], [0.29, -0.9]])
    labels = point_regions(store, model="one", points=u).column("label").to_pylist()
    assert labels == [1, 0, 1, 0]


def test_labels_and_churn_match_the_models_own_predictions(store: geomstore.Store) -> None:
    nets = [mlp((16, 16), 3, seed=s) for s in (10, 6)]
    for step, net in enumerate(nets):
        store.add(geomstore.partition(net, BOX, device="cpu"), model="m", checkpoint=f"c{step}")
    u = np.random.default_rng(0).uniform(-0.99, 0.99, (3000, 2))
    t = point_regions(store, model="m", points=u)
    assert t.num_rows == 2 * len(u)
    labels = np.asarray(t.column("label")).reshape(2, -1)
    region = np.asarray(t.column("region_id")).reshape(2, -1)
    preds, clear = [], np.ones(len(u), dtype=bool)
    for k, net in enumerate(nets):
        cls, margin = _predict(net, u)
        preds.append(cls)
        clear &= margin > 1e-9
        np.testing.assert_array_equal(labels[k][margin > 1e-9], cls[margin > 1e-9])
        part = geomstore.partition(net, BOX, device="cpu")
        centroid_label = np.asarray(part.regions.column("label"))[region[k]]
        assert (centroid_label != cls).any()  # the boundary crosses regions: old code failed
    ch = churn(store, model="m", points=u[clear]).to_pylist()
    assert ch[0]["label_churn"] == np.mean(preds[0][clear] != preds[1][clear])


# 2. near= samples the union of the parts near the points ----------------------------------
def test_near_samples_lie_near_a_point_and_are_uniform_by_length() -> None:
    part = geomstore.partition(_split_box(0.0), BOX, device="cpu")  # boundary: u0 = 0
    near = np.array([[0.0, -0.9], [0.0, 0.9], [0.05, 0.0], [0.0, 0.1]])
    w = 0.1
    s = sample_boundary(part.boundary, part.slice, 40_000, seed=3, near=near, within=w)
    u = np.stack([s["u0"].to_numpy(), s["u1"].to_numpy()], 1)
    dist = np.linalg.norm(u[:, None] - near[None], axis=2).min(1)
    assert dist.max() <= w * (1 + 1e-12)
    np.testing.assert_array_equal(u[:, 0], 0.0)
    # the union on u1: [-1, -0.8], [-0.5 sqrt(3) / 10, 0.2], [0.8, 1]
    h = np.sqrt(w * w - 0.05**2)
    pieces = [(-1.0, -0.8), (-h, 0.2), (0.8, 1.0)]
    length = np.array([b - a for a, b in pieces])
    counts = np.array([((u[:, 1] >= a) & (u[:, 1] <= b)).sum() for a, b in pieces])
    assert counts.sum() == len(u)
    np.testing.assert_allclose(counts / len(u), length / length.sum(), atol=0.01)


def test_near_intervals_match_shapely() -> None:
    part = geomstore.partition(mlp((16, 16), 3, seed=10), BOX, device="cpu")
    b = part.boundary.to_pydict()
    a_pts = np.stack([b["u0_a"], b["u1_a"]], 1)
    b_pts = np.stack([b["u0_b"], b["u1_b"]], 1)
    near = np.random.default_rng(4).uniform(-1, 1, (12, 2))
    w = 0.15
    seg, lo, hi = _near_intervals(a_pts, b_pts, near, w, np.ones(len(a_pts), dtype=bool))
    assert (hi > lo).all()
    same = seg[1:] == seg[:-1]
    assert (lo[1:][same] > hi[:-1][same]).all()  # disjoint, sorted
    got = (np.linalg.norm(b_pts - a_pts, axis=1)[seg] * (hi - lo)).sum()
    disks = shapely.union_all([shapely.Point(p).buffer(w, quad_segs=4096) for p in near])
    lines = shapely.linestrings(np.stack([a_pts, b_pts], 1))
    expect = shapely.length(shapely.intersection(lines, disks)).sum()
    np.testing.assert_allclose(got, expect, rtol=1e-5)
    s = sample_boundary(part.boundary, part.slice, 2000, seed=1, near=near, within=w)
    u = np.stack([s["u0"].to_numpy(), s["u1"].to_numpy()], 1)
    assert np.linalg.norm(u[:, None] - near[None], axis=2).min(1).max() <= w * (1 + 1e-12)


# 3. a class pair some checkpoints lack ------------------------------------------------------
def _three_classes(b2: float) -> nn.Sequential:
    n = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        n[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
        n[0].bias.zero_()
        n[2].weight.copy_(torch.tensor([[1.0, -1.0, 0, 0], [-1.0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
        n[2].bias.copy_(torch.tensor([0.3, -0.3, b2]))
    return n.eval()


def test_pair_samples_come_from_the_checkpoints_that_have_the_pair(
    store: geomstore.Store,
) -> None:
    store.add(geomstore.partition(_three_classes(-10.0), BOX), model="m", checkpoint="early")
    store.add(geomstore.partition(_three_classes(0.0), BOX), model="m", checkpoint="late", step=1)
    t = boundary_samples(store, model="m", n=5, pair=(0, 2))
    assert t.column("checkpoint").to_pylist() == ["late"] * 5
    assert set(t.column("class_a").to_pylist()) == {0}
    assert set(t.column("class_b").to_pylist()) == {2}
    with pytest.raises(NoBoundaryError, match="no decision boundary matches"):
        boundary_samples(store, model="m", n=5, pair=(0, 2), checkpoints=["early"])
    with pytest.raises(NoBoundaryError, match="no decision boundary matches"):
        boundary_samples(store, model="m", n=5, near=np.array([[5.0, 5.0]]), within=0.1)


# 4. the gs_lc macro ---------------------------------------------------------------------------
def test_gs_lc_equals_local_complexity(store: geomstore.Store) -> None:
    part = geomstore.partition(mlp((16, 16), 3, seed=10), BOX, device="cpu")
    pid = store.add(part, model="m", checkpoint="c", step=0)
    rng = np.random.default_rng(7)
    pts = rng.uniform(-0.9, 0.9, (15, 2))
    radii = rng.uniform(0.01, 0.4, 15)
    # a disk inside one region: the largest region, around a point deep inside it
    poly = part.polygons()[int(np.argmax(np.asarray(part.regions.column("area"))))]
    inner = shapely.get_coordinates(shapely.maximum_inscribed_circle(poly))[0]
    depth = poly.exterior.distance(shapely.Point(inner))
    pts = np.vstack([pts, inner])
    radii = np.append(radii, depth / 2)
    for p, r in zip(pts, radii, strict=True):
        lc = local_complexity(store, model="m", points=p[None], radius=float(r)).to_pylist()[0]
        q = "SELECT * FROM gs_lc(?, ?, ?, ?)"
        g = store.sql(q, [pid, float(p[0]), float(p[1]), float(r)]).table.to_pylist()[0]
        assert (g["n_neurons"], g["n_regions"]) == (lc["n_neurons"], lc["n_regions"])
        np.testing.assert_allclose(g["boundary_density"], lc["boundary_density"], rtol=1e-12)
    assert (g["n_neurons"], g["n_regions"], g["boundary_density"]) == (0, 1, 0.0)


# 5. points in input space ------------------------------------------------------------------
def test_local_complexity_projects_input_space_points(store: geomstore.Store) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(6, 2)))[0].T * 2.0
    sl = geomstore.Slice(
        rng.normal(size=6), basis, [[-1, -1], [1, -1], [1, 1], [-1, 1]], input_shape=(2, 3)
    )
    store.add(geomstore.partition(net, sl, device="cpu"), model="m", checkpoint="c", step=0)
    u = rng.uniform(-0.9, 0.9, (30, 2))
    off = rng.normal(size=(30, 6))
    off -= (off @ basis.T) @ np.linalg.solve(basis @ basis.T, basis)  # orthogonal to the plane
    x = sl.lift(u) + 0.1 * off
    proj = sl.project(x)[0]
    np.testing.assert_allclose(proj, u, atol=1e-12)
    expect = local_complexity(store, model="m", points=proj, radius=0.2)
    for pts in (x, x.reshape(30, 2, 3)):
        assert local_complexity(store, model="m", points=pts, radius=0.2).equals(expect)
    held = point_regions(store, model="m", points=x.reshape(30, 2, 3))
    assert held.equals(point_regions(store, model="m", points=proj))
    with pytest.raises(geomstore.GeomstoreError, match=r"\(n, 2, 3\) or \(n, 6\)"):
        local_complexity(store, model="m", points=np.zeros((4, 5)), radius=0.2)


# 6. turning points ---------------------------------------------------------------------------
DEMO_STEPS = [0, 1, 2, 3, 4, 5, 7, 9, 13, 17, 24, 33, 45, 61, 84, 116, 159, 218, 299, 411]
DEMO_STEPS += [563, 773, 1062, 1457, 2000]
DEMO_LC = [4.56445, 4.44531, 4.25781, 4.30859, 4.26172, 4.14648, 3.8457, 3.74414, 3.86914]
DEMO_LC += [3.98242, 4.03125, 4.56055, 5.03711, 4.63867, 4.12695, 3.98242, 4.39062]
DEMO_LC += [4.40625, 4.53516, 4.72461, 4.7832, 4.86914, 5.00977, 4.80469, 4.72461]


def test_turning_points_of_the_demo_curve_skip_small_bumps() -> None:
    tp = turning_points(DEMO_LC)
    steps = {k: DEMO_STEPS[v] if v is not None else None for k, v in tp.items()}
    assert steps == {"first_descent_end": 9, "peak": 45, "second_descent_start": 45}


def test_turning_points_of_a_noisy_double_descent() -> None:
    i = np.arange(100)
    # falls 10 -> 4 until 20, rises to 9 at 50, falls to 3
    clean = np.interp(i, [0, 20, 50, 99], [10.0, 4.0, 9.0, 3.0])
    noisy = clean + np.random.default_rng(0).uniform(-0.3, 0.3, len(i))
    tp = turning_points(noisy)
    assert tp["first_descent_end"] is not None and abs(tp["first_descent_end"] - 20) <= 3
    assert tp["peak"] is not None and abs(tp["peak"] - 50) <= 3
    assert tp["second_descent_start"] == tp["peak"]
    assert turning_points(clean + 0.0) == {
        "first_descent_end": 20,
        "peak": 50,
        "second_descent_start": 50,
    }
    with pytest.raises(ValueError, match="prominence"):
        turning_points(noisy, prominence=0.0)
