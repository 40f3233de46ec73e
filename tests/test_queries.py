"""Queries against independent computations (shapely on the partition, the model itself)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pytest
import shapely
import shapely.affinity
import torch

import geomstore
from geomstore.errors import GeomstoreError, StoreError
from geomstore.queries import local_complexity, partition_stats, sample_boundary
from tests.nets import BOX, mlp

SEEDS = (10, 6)  # both have a decision boundary inside the box


@pytest.fixture(scope="module")
def nets() -> list[torch.nn.Module]:
    return [mlp((16, 16), 3, seed=s) for s in SEEDS]


@pytest.fixture(scope="module")
def parts(nets: list[torch.nn.Module]) -> list[geomstore.Partition]:
    return [geomstore.partition(n, BOX, device="cpu") for n in nets]


@pytest.fixture
def store(tmp_path: Path, parts: list[geomstore.Partition]) -> Iterator[geomstore.Store]:
    with geomstore.open(tmp_path / "s") as s:
        for step, p in zip((0, 100), parts, strict=True):
            s.add(p, model="net", checkpoint=f"step{step}", step=step, metrics={"acc": step / 100})
        yield s


def _reference_lc(part: geomstore.Partition, u: np.ndarray, r: float, shape: str) -> list[dict]:
    e = part.edges.to_pydict()
    segs = shapely.linestrings(
        np.stack([np.stack([e["u0_a"], e["u1_a"]], 1), np.stack([e["u0_b"], e["u1_b"]], 1)], 1)
    )
    polys = part.polygons()
    out = []
    for p in u:
        if shape == "disk":
            hood = shapely.Point(p).buffer(r, quad_segs=512)
        else:
            hood = shapely.Polygon(
                [(p[0] + r, p[1]), (p[0], p[1] + r), (p[0] - r, p[1]), (p[0], p[1] - r)]
            )
        inter = shapely.intersection(segs, hood)
        lens = shapely.length(inter)
        meets = lens > 0
        neurons = {
            (e["layer"][i], e["neuron"][i])
            for i in np.nonzero(meets)[0]
            if e["layer"][i] is not None
        }
        n_regions = int((shapely.intersects(polys, hood)).sum())
        out.append(
            {
                "n_neurons": len(neurons),
                "n_regions": n_regions,
                # the domain's border (layer null) is no neuron's boundary: not counted
                "density": float(
                    sum(x for x, layer in zip(lens, e["layer"], strict=True) if layer is not None)
                    / hood.area
                ),
            }
        )
    return out


@pytest.mark.parametrize("shape", ["disk", "diamond"])
def test_local_complexity_matches_shapely(
    store: geomstore.Store, parts: list[geomstore.Partition], shape: str
) -> None:
    rng = np.random.default_rng(0)
    u = rng.uniform(-0.9, 0.9, (25, 2))
    r = 0.15
    lc = local_complexity(store, model="net", points=u, radius=r, shape=shape)
    assert lc.num_rows == 2 * len(u)
    assert lc.column("step").to_pylist() == [0] * len(u) + [100] * len(u)
    rows = lc.to_pylist()
    for k, part in enumerate(parts):
        ref = _reference_lc(part, u, r, shape)
        got = rows[k * len(u) : (k + 1) * len(u)]
        assert [g["n_neurons"] for g in got] == [x["n_neurons"] for x in ref]
        assert [g["n_regions"] for g in got] == [x["n_regions"] for x in ref]
        assert all(sum(g["neurons_per_layer"]) == g["n_neurons"] for g in got)
        rtol = 1e-4 if shape == "disk" else 1e-9  # the shapely disk is a polygon
        np.testing.assert_allclose(
            [g["boundary_density"] for g in got], [x["density"] for x in ref], rtol=rtol, atol=1e-9
        )
    assert max(g["n_neurons"] for g in rows) > 0


def test_local_complexity_on_a_stored_dataset(store: geomstore.Store) -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (12, 2))
    store.add_points("probe", BOX, x[:8], labels=[0] * 8, split="train")
    store.add_points("probe", BOX, x[8:], labels=[1] * 4, split="test")
    lc = local_complexity(store, model="net", points="probe", radius=0.2, checkpoints=["step100"])
    assert lc.num_rows == 12
    assert sorted(set(lc.column("split").to_pylist())) == ["test", "train"]
    direct = local_complexity(
        store,
        model="net",
        checkpoints=["step100"],
        radius=0.2,
        points=np.concatenate([x[8:], x[:8]]),
    )  # same order: split
    assert lc.column("n_neurons").to_pylist() == direct.column("n_neurons").to_pylist()


def test_local_complexity_errors(store: geomstore.Store) -> None:
    with pytest.raises(GeomstoreError, match="'disk', 'diamond'"):
        local_complexity(store, model="net", points=np.zeros((1, 2)), radius=0.1, shape="ball")
    with pytest.raises(StoreError, match=r"models in this store: \['net'\]"):
        local_complexity(store, model="other", points=np.zeros((1, 2)), radius=0.1)
    with pytest.raises(GeomstoreError, match=r"shape \(n, 2\)"):
        local_complexity(store, model="net", points=np.zeros((2, 3)), radius=0.1)
    with pytest.raises(GeomstoreError, match="no stored points"):
        local_complexity(store, model="net", points="nothing", radius=0.1)


def test_partition_stats_match_the_tables(
    store: geomstore.Store, parts: list[geomstore.Partition]
) -> None:
    st = partition_stats(store, model="net").to_pylist()
    assert [s["step"] for s in st] == [0, 100]
    for s, part in zip(st, parts, strict=True):
        area = np.asarray(part.regions.column("area"))
        slope = np.asarray(part.regions.column("slope_norm"))
        assert s["n_regions"] == part.n_regions
        np.testing.assert_allclose(s["area_mean"], area.mean(), rtol=1e-12)
        np.testing.assert_allclose(s["area_std"], area.std(), rtol=1e-9)
        np.testing.assert_allclose(s["area_q50"], np.quantile(area, 0.5), rtol=1e-9)
        np.testing.assert_allclose(s["slope_norm_max"], slope.max(), rtol=1e-12)
        np.testing.assert_allclose(
            s["boundary_length"], np.asarray(part.boundary.column("length")).sum(), rtol=1e-12
        )
        assert s["n_boundary_segments"] == part.boundary.num_rows
        assert '"acc"' in s["metrics"]


def test_boundary_samples_lie_on_the_boundary(
    nets: list[torch.nn.Module], parts: list[geomstore.Partition]
) -> None:
    net, part = nets[0], parts[0]
    smp = sample_boundary(part.boundary, part.slice, 400, seed=7)
    again = sample_boundary(part.boundary, part.slice, 400, seed=7)
    assert smp.equals(again)
    x = torch.tensor(np.asarray(smp.column("x").to_pylist()))
    with torch.no_grad():
        out = net.double()(x).numpy()
    ca, cb = np.asarray(smp.column("class_a")), np.asarray(smp.column("class_b"))
    r = np.arange(len(out))
    np.testing.assert_allclose(out[r, ca], out[r, cb], atol=1e-9)
    top2 = np.sort(out, 1)[:, -2:]
    np.testing.assert_allclose(np.sort(np.stack([out[r, ca], out[r, cb]], 1), 1), top2, atol=1e-9)
    for delta, expect in ((1e-3, cb), (-1e-3, ca)):
        pushed = sample_boundary(part.boundary, part.slice, 400, seed=7, offset=delta)
        xp = torch.tensor(np.asarray(pushed.column("x").to_pylist()))
        with torch.no_grad():
            pred = net(xp).argmax(1).numpy()
        assert (pred == expect).mean() > 0.97  # a few land past a kink of the boundary


def test_boundary_sampling_options(parts: list[geomstore.Partition]) -> None:
    part = parts[0]
    pairs = set(
        zip(
            part.boundary.column("class_a").to_pylist(),
            part.boundary.column("class_b").to_pylist(),
            strict=True,
        )
    )
    pair = sorted(pairs)[0]
    smp = sample_boundary(part.boundary, part.slice, 50, pair=pair)
    assert set(
        zip(smp.column("class_a").to_pylist(), smp.column("class_b").to_pylist(), strict=True)
    ) == {pair}
    u0 = part.boundary.column("u0_a")[0].as_py()
    u1 = part.boundary.column("u1_a")[0].as_py()
    near = sample_boundary(part.boundary, part.slice, 50, near=np.array([[u0, u1]]), within=0.1)
    d = np.hypot(np.asarray(near.column("u0")) - u0, np.asarray(near.column("u1")) - u1)
    assert d.max() <= 0.1 + 1e-12
    with pytest.raises(GeomstoreError, match="within="):
        sample_boundary(part.boundary, part.slice, 5, near=np.zeros((1, 2)))
    with pytest.raises(GeomstoreError, match="no decision boundary"):
        sample_boundary(part.boundary, part.slice, 5, near=np.array([[50.0, 50.0]]), within=0.1)


def test_turning_points_of_a_descent_ascent_descent_curve() -> None:
    from geomstore.queries import turning_points

    assert turning_points([9, 7, 4, 5, 8, 6, 2]) == {
        "first_descent_end": 2,
        "peak": 4,
        "second_descent_start": 4,
    }
    assert turning_points([1, 2, 3]) == {
        "first_descent_end": None,
        "peak": 2,
        "second_descent_start": None,
    }
    assert turning_points([3, 2]) == {
        "first_descent_end": None,
        "peak": None,
        "second_descent_start": None,
    }


def test_lc_trajectory_aggregates_local_complexity(store: geomstore.Store) -> None:
    from geomstore.queries import lc_trajectory

    u = np.random.default_rng(2).uniform(-1, 1, (40, 2))
    table, turns = lc_trajectory(store, model="net", points=u, radius=0.2)
    lc = local_complexity(store, model="net", points=u, radius=0.2)
    rows = table.to_pylist()
    assert [r["step"] for r in rows] == [0, 100]
    for r in rows:
        vals = [x["n_neurons"] for x in lc.to_pylist() if x["step"] == r["step"]]
        assert r["n_points"] == 40
        np.testing.assert_allclose(r["lc_mean"], np.mean(vals))
        np.testing.assert_allclose(r["lc_q50"], np.quantile(vals, 0.5))
        assert '"acc"' in r["metrics"]
    assert set(turns) == {"all"}


def test_point_regions_and_distances_match_shapely(
    store: geomstore.Store, parts: list[geomstore.Partition]
) -> None:
    from geomstore.queries import point_regions

    u = np.random.default_rng(5).uniform(-0.95, 0.95, (30, 2))
    t = point_regions(store, model="net", points=u).to_pylist()
    assert len(t) == 60
    for k, part in enumerate(parts):
        polys = part.polygons()
        bd = part.boundary.to_pydict()
        segs = shapely.linestrings(
            np.stack(
                [np.stack([bd["u0_a"], bd["u1_a"]], 1), np.stack([bd["u0_b"], bd["u1_b"]], 1)], 1
            )
        )
        for row in t[k * 30 : (k + 1) * 30]:
            p = shapely.Point(u[row["point_id"]])
            poly = polys[row["region_id"]]
            assert poly.covers(p)
            assert row["pattern"] == part.regions.column("pattern")[row["region_id"]].as_py()
            np.testing.assert_allclose(
                row["distance_to_border"], poly.exterior.distance(p), atol=1e-12
            )
            np.testing.assert_allclose(
                row["distance_to_boundary"], shapely.distance(segs, p).min(), atol=1e-12
            )
            # the model predicts the region's label at the point
            a, c = part.affine_maps()
            out = a[row["region_id"]] @ u[row["point_id"]] + c[row["region_id"]]
            assert int(out.argmax()) == row["label"] or np.sort(out)[-1] - np.sort(out)[-2] < 1e-9


def test_churn_between_checkpoints(
    store: geomstore.Store, parts: list[geomstore.Partition]
) -> None:
    from geomstore.queries import churn

    u = np.random.default_rng(6).uniform(-0.95, 0.95, (50, 2))
    ch = churn(store, model="net", points=u).to_pylist()
    assert len(ch) == 1 and ch[0]["previous"] == "step0" and ch[0]["n_points"] == 50
    tree = [shapely.STRtree(p.polygons()) for p in parts]
    pats = []
    for k, part in enumerate(parts):
        idx, reg = tree[k].query(shapely.points(u), predicate="within")
        holder = np.full(len(u), -1)
        holder[idx] = reg
        pats.append([part.regions.column("pattern")[int(r)].as_py() for r in holder])
    expect = np.mean([a != b for a, b in zip(pats[0], pats[1], strict=True)])
    np.testing.assert_allclose(ch[0]["pattern_churn"], expect)
    assert 0 < ch[0]["pattern_churn"] <= 1  # two different networks: most points change


def test_migration_index_matches_shapely_buffers(
    store: geomstore.Store, parts: list[geomstore.Partition]
) -> None:
    from geomstore.queries import migration_index

    d = 0.05
    mi = migration_index(store, model="net", distance=d).to_pylist()
    assert [r["step"] for r in mi] == [0, 100]
    for row, part in zip(mi, parts, strict=True):
        e, b = part.edges.to_pydict(), part.boundary.to_pydict()
        inner = [i for i, r in enumerate(e["region_right"]) if r is not None]
        edges = shapely.linestrings(
            np.stack(
                [
                    np.stack([np.take(e["u0_a"], inner), np.take(e["u1_a"], inner)], 1),
                    np.stack([np.take(e["u0_b"], inner), np.take(e["u1_b"], inner)], 1),
                ],
                1,
            )
        )
        bd = shapely.union_all(
            shapely.linestrings(
                np.stack(
                    [np.stack([b["u0_a"], b["u1_a"]], 1), np.stack([b["u0_b"], b["u1_b"]], 1)], 1
                )
            )
        )
        zone = bd.buffer(d, quad_segs=256)  # polygonal: slightly inside the true zone
        near = float(shapely.length(shapely.intersection(edges, zone)).sum())
        total = float(shapely.length(edges).sum())
        np.testing.assert_allclose(row["edge_length"], total, rtol=1e-12)
        np.testing.assert_allclose(row["near_length"], near, rtol=2e-4)
        assert 0 < row["share"] < 1


def test_near_intervals_of_a_crossing_and_a_parallel_segment() -> None:
    from geomstore.queries.migration import near_intervals

    ea = np.array([[-1.0, 0.0], [-1.0, 0.5]])
    eb = np.array([[1.0, 0.0], [1.0, 0.5]])
    sa = np.array([[0.0, -1.0], [-0.5, 0.0]])
    sb = np.array([[0.0, 1.0], [0.5, 0.0]])
    t0, t1 = near_intervals(ea, eb, sa, sb, 0.1)
    np.testing.assert_allclose([t0[0], t1[0]], [0.45, 0.55], atol=1e-12)  # crossing
    assert t0[1] > t1[1]  # parallel at distance 0.5: empty


def test_fragmentation_matches_shapely_union(parts: list[geomstore.Partition]) -> None:
    from geomstore.engine.reference import _halfplane
    from geomstore.queries.fragmentation import fragmentation

    for part in parts:
        fr = fragmentation(part).to_pylist()
        amap, cvec = part.affine_maps()
        k = cvec.shape[1]
        centre = np.zeros(2)
        for cls in range(k):
            cells = []
            for r, poly in enumerate(part.polygons()):
                cell = poly
                for j in range(k):
                    if j != cls:
                        cell = cell.intersection(
                            _halfplane(
                                amap[r, cls] - amap[r, j],
                                cvec[r, cls] - cvec[r, j],
                                10.0,
                                True,
                                centre,
                            )
                        )
                if cell.area > 0:
                    cells.append(cell)
            # snap: cells of neighbouring regions meet up to 1e-16; corner contact stays apart
            snapped = shapely.set_precision(np.array(cells, dtype=object), 1e-10)
            union = shapely.union_all(snapped) if cells else shapely.Polygon()
            pieces = len(union.geoms) if hasattr(union, "geoms") else int(not union.is_empty)
            np.testing.assert_allclose(fr[cls]["area"], union.area, rtol=1e-7, atol=1e-9)
            assert fr[cls]["components"] == pieces, (cls, fr[cls], pieces)
        np.testing.assert_allclose(sum(r["area"] for r in fr), 4.0, rtol=1e-9)


def test_fragmentation_counts_separate_pieces() -> None:
    from torch import nn

    from geomstore.queries.fragmentation import fragmentation

    # logits (|x| - 0.5, 0) and (|x| + |y| - 0.6 (twice), ...): class 0 wins in two strips
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([-0.5, 0.0]))
    part = geomstore.partition(net, BOX, device="cpu")
    fr = fragmentation(part).to_pylist()
    assert [r["components"] for r in fr] == [2, 1]
    np.testing.assert_allclose([r["area"] for r in fr], [2.0, 2.0], rtol=1e-12)
    # a diamond |x| + |y| < 0.6 of class 1 inside class 0: one piece each
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([-0.6, 0.0]))
    fr = fragmentation(geomstore.partition(net, BOX, device="cpu")).to_pylist()
    assert [r["components"] for r in fr] == [1, 1]
    b = float(np.float32(0.6))  # the model holds float32 weights; the partition is exact for them
    np.testing.assert_allclose(fr[1]["area"], 2 * b**2, rtol=1e-12)


def test_approximate_lc_matches_explicit_weights() -> None:
    from geomstore.queries import approximate_lc

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 20),
        torch.nn.ReLU(),
        torch.nn.Linear(20, 10),
        torch.nn.ReLU(),
        torch.nn.Linear(10, 2),
    ).eval()
    x = np.random.default_rng(1).normal(size=(15, 6))
    r, p = 0.3, 4
    got = approximate_lc(net, x, radius=r, directions=p, seed=2).to_pylist()
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(6, p)))
    w1, b1 = net[0].weight.double().detach().numpy(), net[0].bias.double().detach().numpy()
    w2, b2 = net[2].weight.double().detach().numpy(), net[2].bias.double().detach().numpy()
    for i, row in enumerate(got):
        verts = x[i] + np.concatenate([q.T, -q.T]) * r
        h1 = verts @ w1.T + b1
        h2 = np.maximum(h1, 0) @ w2.T + b2
        c1 = int(((h1 > 0) != (h1[:1] > 0)).any(0).sum())
        c2 = int(((h2 > 0) != (h2[:1] > 0)).any(0).sum())
        assert row["neurons_per_layer"] == [c1, c2]
        assert row["n_neurons"] == c1 + c2
    assert sum(r["n_neurons"] for r in got) > 0


def test_agreement_of_two_checkpoints(
    nets: list[torch.nn.Module], parts: list[geomstore.Partition]
) -> None:
    from geomstore.queries import agreement

    a, b = parts
    same = agreement(a, a).to_pylist()
    assert same[-1]["agree_share"] == pytest.approx(1.0, rel=1e-9)
    assert same[-1]["hausdorff"] == pytest.approx(0.0, abs=1e-12)
    rows = agreement(a, b).to_pylist()
    total = rows[-1]
    # independent: predicted class on a fine grid of cell centres, from both models
    g = (np.arange(400) + 0.5) / 400 * 2 - 1
    uu = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    with torch.no_grad():
        pa_ = nets[0].double()(torch.tensor(uu)).argmax(1).numpy()
        pb_ = nets[1].double()(torch.tensor(uu)).argmax(1).numpy()
    np.testing.assert_allclose(total["agree_share"], (pa_ == pb_).mean(), atol=5e-3)
    for r in rows[:-1]:
        np.testing.assert_allclose(
            r["agree_area"], 4.0 * ((pa_ == r["class"]) & (pb_ == r["class"])).mean(), atol=2e-2
        )

    # boundary movement against shapely's densified Hausdorff distance
    def lines(p: geomstore.Partition) -> shapely.MultiLineString:
        bd = p.boundary.to_pydict()
        return shapely.MultiLineString(
            [
                [(bd["u0_a"][i], bd["u1_a"][i]), (bd["u0_b"][i], bd["u1_b"][i])]
                for i in range(p.boundary.num_rows)
            ]
        )

    ref = shapely.hausdorff_distance(lines(a), lines(b), densify=0.0005)
    np.testing.assert_allclose(total["hausdorff"], ref, rtol=1e-3)
    assert 0 < total["mean_distance"] <= total["hausdorff"]


def test_store_level_queries_over_checkpoints(
    store: geomstore.Store, parts: list[geomstore.Partition]
) -> None:
    from geomstore.queries import (
        agreement,
        agreement_over,
        boundary_samples,
        fragmentation,
        fragmentation_over,
    )

    smp = boundary_samples(store, model="net", n=20, seed=3)
    assert smp.column("checkpoint").to_pylist() == ["step0"] * 20 + ["step100"] * 20
    direct = sample_boundary(parts[1].boundary, parts[1].slice, 20, seed=3)
    got = smp.filter(pa.compute.equal(smp.column("checkpoint"), "step100"))
    np.testing.assert_allclose(
        np.sort(got.column("u0").to_numpy()), np.sort(direct.column("u0").to_numpy()), atol=1e-15
    )
    fr = fragmentation_over(store, model="net")
    assert fr.num_rows == 6
    assert (
        fr.slice(3, 3).select(["class", "components"]).to_pylist()
        == fragmentation(parts[1]).select(["class", "components"]).to_pylist()
    )
    ag = agreement_over(store, model="net").to_pylist()
    ref = agreement(parts[0], parts[1]).to_pylist()
    assert ag[-1]["previous"] == "step0" and ag[-1]["checkpoint"] == "step100"
    np.testing.assert_allclose(ag[-1]["agree_share"], ref[-1]["agree_share"], rtol=1e-12)


def test_eccentricity_of_known_shapes() -> None:
    from geomstore.queries.stats import eccentricity

    square = shapely.to_wkb(shapely.box(0, 0, 1, 1))
    rect = shapely.to_wkb(shapely.box(0, 0, 4, 1))  # moments 4^2 : 1^2
    tilted = shapely.to_wkb(shapely.affinity.rotate(shapely.box(0, 0, 4, 1), 30))
    ecc = eccentricity([square, rect, tilted])
    np.testing.assert_allclose(ecc, [0.0, np.sqrt(1 - 1 / 16), np.sqrt(1 - 1 / 16)], atol=1e-12)


def test_partition_stats_eccentricity(
    store: geomstore.Store, parts: list[geomstore.Partition]
) -> None:
    from geomstore.queries.stats import eccentricity

    st = partition_stats(store, model="net").to_pylist()
    ecc = eccentricity(parts[0].regions.column("geometry").to_pylist())
    np.testing.assert_allclose(st[0]["eccentricity_mean"], ecc.mean(), rtol=1e-12)
    assert 0 < st[0]["eccentricity_mean"] < 1


def test_boundary_samples_are_shaped_like_model_inputs() -> None:
    rng = np.random.default_rng(0)
    sl = geomstore.Slice.through(*(rng.normal(size=(1, 2, 2)) for _ in range(3)), margin=2.0)
    for seed in range(20):  # the first seed whose network has a boundary on the plane
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        ).eval()
        part = geomstore.partition(net, sl, device="cpu")
        if part.boundary.num_rows:
            break
    assert part.boundary.num_rows > 0
    smp = sample_boundary(part.boundary, part.slice, 10, seed=0)
    x = smp.column("x").combine_chunks().to_numpy_ndarray()
    assert x.shape == (10, 1, 2, 2)
    with torch.no_grad():
        out = net.double()(torch.tensor(x)).numpy()  # copies the read-only Arrow view
    r = np.arange(10)
    ca, cb = np.asarray(smp.column("class_a")), np.asarray(smp.column("class_b"))
    np.testing.assert_allclose(out[r, ca], out[r, cb], atol=1e-9)
