"""Clipping, split rounds and the first layer's arrangement, against shapely.

Every test here fails on a broken clip: a lost or doubled vertex, a child on the wrong
side, a wrong chord label, a missing or extra face of an arrangement.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import shapely
import torch
from shapely.geometry import LineString, Polygon, box
from shapely.geometry.polygon import orient
from shapely.ops import polygonize, unary_union
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import geomstore.engine.arrangement as arrangement
import geomstore.engine.split as split
from geomstore import Slice, partition
from geomstore.engine.reference import reference_regions
from geomstore.engine.split import clip_both
from tests.nets import BOX, mlp

HOW = ["arrangement", "rounds"]


def _how(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Split line units by arrangements (every layer, any device) or in rounds (also the
    first layer: no arrangement is small enough)."""
    monkeypatch.setattr(split, "ARRANGEMENT_DEVICES", ("cpu", "cuda") if how == HOW[0] else ())
    if how == HOW[1]:
        monkeypatch.setattr(arrangement, "MAX_ELEMENTS", 0)


def _convex(rng: np.random.Generator) -> Polygon:
    """A random convex polygon of 3-12 vertices, counter-clockwise."""
    hull = shapely.MultiPoint(rng.uniform(-1, 1, size=(rng.integers(3, 13), 2))).convex_hull
    assert isinstance(hull, Polygon) and hull.area > 1e-3
    return orient(hull, 1.0)


def _padded(polys: list[Polygon], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (P, width, 2) vertices, slots from n on repeating vertex 0, and counts."""
    verts = np.zeros((len(polys), width, 2))
    n = np.zeros(len(polys), dtype=np.int64)
    for i, p in enumerate(polys):
        xy = np.asarray(p.exterior.coords)[:-1]
        n[i] = len(xy)
        verts[i, : len(xy)] = xy
        verts[i, len(xy) :] = xy[0]
    return torch.as_tensor(verts), torch.as_tensor(n)


def test_clip_both_matches_shapely_on_random_lines() -> None:
    rng = np.random.default_rng(0)
    polys = [_convex(rng) for _ in range(200)]
    verts, n = _padded(polys, 14)
    # a line through a random interior point, random direction: it crosses the polygon
    inner = np.array([np.asarray(p.representative_point().coords)[0] for p in polys])
    ang = rng.uniform(0, np.pi, size=len(polys))
    a = np.stack([np.cos(ang), np.sin(ang)], 1)
    b = -(a * inner).sum(1)
    f = torch.as_tensor(np.einsum("pvd,pd->pv", verts.numpy(), a) + b[:, None])
    side = torch.arange(14)[None, :].repeat(len(polys), 1) + 100
    cut = 1000 + torch.arange(len(polys))
    out_v, out_n, out_s = clip_both(verts, f, n, side, cut)
    s = len(polys)
    for i, poly in enumerate(polys):
        far = 10.0
        d = np.array([-a[i, 1], a[i, 0]])
        p0 = inner[i] - far * d
        p1 = inner[i] + far * d
        half_pos = Polygon([p0, p1, p1 + far * a[i], p0 + far * a[i]])
        half_neg = Polygon([p0, p1, p1 - far * a[i], p0 - far * a[i]])
        for child, half in ((i, half_pos), (s + i, half_neg)):
            k = int(out_n[child])
            got = Polygon(out_v[child, :k].numpy())
            want = poly.intersection(half)
            assert got.is_valid and got.exterior.is_ccw
            assert abs(got.area - want.area) < 1e-12
            assert got.hausdorff_distance(want) < 1e-12  # (overlays of equal shapes are fragile)
            assert len(shapely.get_coordinates(want)) - 1 == k
            # padding repeats vertex 0; exactly one side is the chord, labelled with the cut
            assert torch.equal(out_v[child, k:], out_v[child, :1].expand(out_v.shape[1] - k, 2))
            labels = out_s[child, :k]
            assert int((labels == 1000 + i).sum()) == 1
            j = int(torch.nonzero(labels == 1000 + i)[0, 0])
            q0, q1 = out_v[child, j].numpy(), out_v[child, (j + 1) % k].numpy()
            assert abs(a[i] @ q0 + b[i]) < 1e-12 and abs(a[i] @ q1 + b[i]) < 1e-12
            assert bool((labels[labels != 1000 + i] < 114).all())


def test_clip_both_through_vertices() -> None:
    # the square cut along its diagonal: both children are triangles, no new vertex
    verts, n = _padded([box(0, 0, 1, 1)], 5)
    f = verts[..., 0] - verts[..., 1]
    side = torch.full((1, 5), -1)
    out_v, out_n, out_s = clip_both(verts, f, n, side, torch.tensor([7]))
    assert out_n.tolist() == [3, 3]
    for child in range(2):
        tri = Polygon(out_v[child, :3].numpy())
        assert tri.area == pytest.approx(0.5, abs=1e-15)
        assert int((out_s[child, :3] == 7).sum()) == 1


def _f32(x: np.ndarray) -> np.ndarray:
    """The values a float32 layer holds (the network's lines are exactly these)."""
    return x.astype(np.float32).astype(np.float64)


def _lines_net(w: np.ndarray, b: np.ndarray) -> nn.Sequential:
    lin = nn.Linear(2, len(w))
    out = nn.Linear(len(w), 1)
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(w))
        lin.bias.copy_(torch.as_tensor(b))
    return nn.Sequential(lin, nn.ReLU(), out).eval()


def _shapely_faces(w: np.ndarray, b: np.ndarray, dom: Polygon) -> list[Polygon]:
    segs: list[Any] = [dom.exterior]
    for (a0, a1), c in zip(w, b, strict=True):
        d = np.array([-a1, a0]) / np.hypot(a0, a1)
        p = -c * np.array([a0, a1]) / (a0 * a0 + a1 * a1)
        segs.append(LineString([p - 10 * d, p + 10 * d]).intersection(dom))
    return [f for f in polygonize(unary_union(segs)) if f.area > 1e-12]


def _compare_faces(part: Any, faces: list[Polygon]) -> None:
    assert part.n_regions == len(faces)
    ours = np.sort(np.asarray(part.regions.column("area")))
    np.testing.assert_allclose(ours, np.sort([f.area for f in faces]), rtol=1e-9, atol=1e-13)
    # each region equals one shapely face (same centroid face, same area)
    tree = shapely.STRtree(faces)
    for poly in part.polygons():
        hit = tree.query(poly.representative_point(), predicate="within")
        assert len(hit) == 1
        assert faces[int(hit[0])].symmetric_difference(poly).area < 1e-10


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("seed", range(3))
def test_first_layer_matches_shapely(how: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _how(monkeypatch, how)
    rng = np.random.default_rng(seed)
    w = _f32(rng.normal(size=(25, 2)))
    b = _f32(rng.uniform(-0.8, 0.8, size=25))
    part = partition(_lines_net(w, b), BOX, device="cpu")
    _compare_faces(part, _shapely_faces(w, b, box(-1, -1, 1, 1)))


@pytest.mark.parametrize("how", HOW)
def test_degenerate_lines_fall_back_and_stay_exact(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _how(monkeypatch, how)
    # three lines through (0.25, 0.125), one through the corners (1, 1) and (-1, -1), a
    # duplicated line and one parallel to it (all exact in float32)
    w = np.array([[1, 0], [0, 1], [1, 1], [1, -1], [2, -1], [2, -1], [2, -1.0]])
    b = np.array([-0.25, -0.125, -0.375, 0.0, 0.25, 0.25, -0.5])
    sl = Slice.box((-1, -1), (1, 1))
    part = partition(_lines_net(w, b), sl, device="cpu")
    _compare_faces(part, _shapely_faces(w, b, box(-1, -1, 1, 1)))


def test_arrangement_refuses_lines_not_in_general_position() -> None:
    from geomstore.engine.graph import Program
    from geomstore.engine.split import CutLog, Polys, crossings

    w = np.array([[1, 0], [0, 1], [1, 1.0]])
    prog = Program(_lines_net(w, np.zeros(3)), BOX.input_shape, torch.device("cpu"))
    spec = prog.nonlinearities[0]
    dom = torch.as_tensor(BOX.domain - BOX.domain.mean(0))
    cells = Polys(dom[None], torch.tensor([4]), -(1 + torch.arange(4))[None], torch.zeros(1))
    coef = torch.as_tensor(np.concatenate([w.T, np.zeros((1, 3))]))[None]
    state0, cross = crossings(spec, coef, cells.verts, cells.n, 1e-10)
    assert len(cross) == 3
    cuts = CutLog()
    res = arrangement.arrangements(cells, state0, cross, 1e-10, cuts, 0)
    assert res is not None and bool(res[2].all()) and len(res[0]) == 0  # left for rounds
    ok = coef.clone()
    ok[0, 2] = torch.tensor([0.1, -0.2, 0.05])  # move them apart: 7 faces
    state0, cross = crossings(spec, ok, cells.verts, cells.n, 1e-10)
    res = arrangement.arrangements(cells, state0, cross, 1e-10, CutLog(), 0)
    assert res is not None and not bool(res[2].any()) and len(res[0]) == 7


@pytest.mark.parametrize("widths", [(12, 10), (16, 16, 8)])
def test_arrangement_and_rounds_agree(
    widths: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = mlp(widths, 2, seed=3)
    parts = []
    for how in HOW:
        _how(monkeypatch, how)
        parts.append(partition(model, BOX, device="cpu"))
    a, r = parts
    assert a.n_regions == r.n_regions
    key_a = np.array([bytes(s) for s in a.states])
    key_r = np.array([bytes(s) for s in r.states])
    oa, orr = np.argsort(key_a), np.argsort(key_r)
    assert (key_a[oa] == key_r[orr]).all()
    np.testing.assert_allclose(
        np.asarray(a.regions.column("area"))[oa],
        np.asarray(r.regions.column("area"))[orr],
        atol=1e-14,
    )
    ma, ca = a.affine_maps()
    mr, cr = r.affine_maps()
    np.testing.assert_allclose(ma[oa], mr[orr], atol=1e-12)
    np.testing.assert_allclose(ca[oa], cr[orr], atol=1e-12)
    assert a.edges.num_rows == r.edges.num_rows


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("how", HOW)
def test_operations_do_not_grow_with_polygons(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the same cell and lines repeated 2x and 32x: the same operations (arrangements: a
    # fixed number per layer; rounds: the same rounds)
    _how(monkeypatch, how)
    from geomstore.engine.graph import Program
    from geomstore.engine.split import Crossings, CutLog, Polys, split_layer

    rng = np.random.default_rng(1)
    w = rng.normal(size=(10, 2))
    prog = Program(_lines_net(w, rng.uniform(-0.5, 0.5, 10)), BOX.input_shape, torch.device("cpu"))
    spec = prog.nonlinearities[0]
    vals = torch.as_tensor(np.concatenate([w, rng.uniform(-0.5, 0.5, (10, 1))], 1))[:, :, None]
    dom = torch.as_tensor(BOX.domain - BOX.domain.mean(0))
    counts = []
    regions = []
    for copies in (2, 32):
        cells = Polys(
            dom[None].repeat(copies, 1, 1),
            torch.full((copies,), 4),
            (-(1 + torch.arange(4)))[None].repeat(copies, 1),
            torch.arange(copies),
        )
        cell = torch.arange(copies).repeat_interleave(10)
        cross = Crossings(cell, torch.arange(10).repeat(copies), vals.repeat(copies, 1, 1))
        state0 = torch.zeros((copies, 10), dtype=torch.uint8)
        with _Count() as c:
            polys, _ = split_layer(spec, cells, state0, cross, 1e-10, CutLog())
        counts.append(c.n)
        regions.append(len(polys))
    assert regions[1] == 16 * regions[0] > 16 * 40
    assert counts[0] == counts[1]


def test_deterministic_bit_for_bit() -> None:
    model = mlp((30, 30), 3, seed=4)
    a = partition(model, BOX, device="cpu")
    b = partition(model, BOX, device="cpu")
    for name in ("regions", "edges", "boundary"):
        assert getattr(a, name).equals(getattr(b, name))


@pytest.mark.parametrize("limit", [1 << 24, 0])
def test_cells_not_in_general_position_go_to_rounds(
    limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # layer 2's unit h1 - h2 runs through the corner (0.25, 0.125) of the cell where both
    # are active: that cell goes to rounds, the others are arrangements (limit 0: all
    # cells of a layer too large for one arrangement go to rounds)
    _how(monkeypatch, HOW[0])
    monkeypatch.setattr(arrangement, "MAX_ELEMENTS", limit)
    left: list[int] = []
    real = arrangement.arrangements

    def spy(*args: Any) -> Any:
        res = real(*args)
        left.append(-1 if res is None else int(res[2].sum()))
        return res

    monkeypatch.setattr(arrangement, "arrangements", spy)
    w1 = [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [0.5, 1.0]]
    b1 = [-0.25, -0.125, 0.0625, 0.3]
    w2 = [[1.0, -1.0, 0.0, 0.0], [0.5, 0.25, -1.0, 0.5], [0.0, 1.0, 1.0, -1.0]]
    b2 = [0.0, -0.1, 0.05]
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for lin, (w, b) in zip((model[0], model[2]), ((w1, b1), (w2, b2)), strict=True):
            lin.weight.copy_(torch.tensor(w))
            lin.bias.copy_(torch.tensor(b))
    part = partition(model.eval(), BOX, device="cpu")
    assert left[1] == (1 if limit else -1)
    ref = reference_regions(model, BOX)
    assert part.n_regions == len(ref)
    ours = sorted(bytes(s) for s in part.states)
    assert ours == sorted(bytes(np.array(p, np.uint8)) for _, p in ref)
    assert part.verify(model).ok


def _max_states_at_vertices(coef: Any, verts: Any, n: Any, cand: Any, tol: float) -> Any:
    """Max units settled at the vertices alone (no pretest): the independent reference.

    A unit is constant when the winner at vertex 0 beats (or equals) every candidate at
    every vertex by the two forms' tolerances; its state is that winner's index.
    """
    p, u = coef.shape[0], cand.shape[0]
    states = np.zeros((p, u), np.uint8)
    crossing = np.zeros((p, u), bool)
    for i in range(p):
        v = verts[i, : n[i]]
        f = v @ coef[i, :2] + coef[i, 2]  # (V, N_in)
        tau = tol * np.hypot(coef[i, 0], coef[i, 1])
        for j in range(u):
            c = cand[j]
            b = int(np.argmax(f[0, c]))
            margin = f[:, c[b], None] - f[:, c] - (tau[c[b]] + tau[c])[None]
            ok = (margin >= 0) | (c == c[b])[None]
            crossing[i, j] = not ok.all()
            states[i, j] = 0 if crossing[i, j] else b
    return states, crossing


@pytest.mark.parametrize("seed", range(4))
def test_max_units_pretest_matches_vertex_tests(seed: int) -> None:
    """The circle pretest of max units changes nothing: same constants, same crossings.

    Candidates include exact copies of one input and inputs that vanish on the whole
    cell (a dead ReLU before a max-pool: ties the pretest must settle like the vertices).
    """
    from geomstore.engine.crossings import _initial_states
    from geomstore.engine.nonlinear import Nonlinearity

    rng = np.random.default_rng(seed)
    p, n_in, k = 40, 24, 4
    verts_t, n_t = _padded([_convex(rng) for _ in range(p)], 12)
    verts, n = verts_t.numpy(), n_t.numpy()
    coef = rng.normal(size=(p, 3, n_in)) * rng.choice([0.05, 1.0, 20.0], size=(p, 1, n_in))
    coef[:, :, :4] = 0.0  # dead inputs: ties on the whole cell
    coef[: p // 2, 2, 4:8] += 50.0  # clear winners: the pretest settles these
    cand = rng.integers(0, n_in, size=(30, k))
    cand[:5, :2] = rng.integers(0, 4, size=(5, 2))  # two dead candidates
    cand[5:10, 1] = cand[5:10, 0]  # a candidate twice
    spec = Nonlinearity(
        layer=0, node=None, name="pool", kind="maxpool",  # type: ignore[arg-type]
        in_shape=(n_in,), out_shape=(30,), candidates=torch.as_tensor(cand),
    )  # fmt: skip
    tol = 1e-9
    states, crossing = _initial_states(spec, torch.as_tensor(coef), verts_t, n_t, tol)
    ref_states, ref_crossing = _max_states_at_vertices(coef, verts, n, cand, tol)
    assert 0 < ref_crossing.sum() < ref_crossing.size  # both kinds occur
    np.testing.assert_array_equal(crossing.numpy(), ref_crossing)
    np.testing.assert_array_equal(states.numpy(), ref_states)


class _PoolNet(nn.Module):
    """conv, relu, 2x2 max-pool (4 candidates), conv, relu, 3x3 max-pool with stride 1
    (9 candidates), linear: tournaments of both lengths in one network."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 2 * 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        h = nn.functional.max_pool2d(torch.relu(self.c2(h)), 3, stride=1)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("seed", [0, 1])
def test_max_tournaments_at_once_give_the_per_test_partition(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Max units split with every tournament advancing at once give the partition of one
    test per polygon per round: the same patterns, areas and edges, in fewer operations."""
    from tests.nets import ConvKinds, digits_slice

    for net in (_PoolNet().eval(), ConvKinds(seed).eval()):
        sl = digits_slice(seed)
        got = {}
        for at_once in (False, True):
            monkeypatch.setattr(split, "MAX_TOURNAMENTS_AT_ONCE", at_once)
            with _Count() as c:
                part = partition(net, sl, device="cpu")
            h = part.pattern_hashes()
            order = np.lexsort(h.T)
            area = part.regions.column("area").to_numpy()[order]
            got[at_once] = (h[order], area, part.edges.num_rows, c.n, part)
        (h0, a0, e0, n0, _), (h1, a1, e1, n1, part) = got[False], got[True]
        assert len(h1) > 50 and np.array_equal(h0, h1) and e0 == e1
        np.testing.assert_allclose(a1, a0, rtol=0, atol=1e-12)
        assert n1 < n0
        assert part.verify(net, grid=32).ok


def test_wkb_encoders_write_shapelys_bytes_in_any_block_size() -> None:
    """Polygon and segment WKB, written by tensor code a block of rows at a time, are
    the bytes shapely writes (little-endian ISO WKB, closed counter-clockwise rings)."""
    from geomstore.engine.wkb import polygons_wkb, segments_wkb

    rng = np.random.default_rng(4)
    n = torch.as_tensor(rng.integers(3, 9, 40))
    ang = np.sort(rng.uniform(0, 2 * np.pi, (40, 9)), axis=1)
    radius = rng.uniform(0.5, 2, (40, 1, 1))
    verts = torch.as_tensor(np.stack([np.cos(ang), np.sin(ang)], 2) * radius)
    want = [
        shapely.to_wkb(Polygon(verts[i, : n[i]].numpy()), byte_order=1, flavor="iso")
        for i in range(40)
    ]
    for rows in (1, 7, 1 << 18):
        assert polygons_wkb(verts, n, rows=rows).to_pylist() == want
    a, b = torch.as_tensor(rng.normal(size=(25, 2))), torch.as_tensor(rng.normal(size=(25, 2)))
    segs = segments_wkb(a, b).to_pylist()
    assert segs == [
        shapely.to_wkb(LineString([a[i].numpy(), b[i].numpy()]), byte_order=1, flavor="iso")
        for i in range(25)
    ]
    assert polygons_wkb(verts[:0], n[:0]).to_pylist() == []


@pytest.mark.parametrize("kind", ["relu", "leaky", "prelu", "abs", "hardtanh"])
def test_unit_change_is_the_difference_of_unit_values(kind: str) -> None:
    """The rank-1 updates of the descent use ``unit_change``; for every line kind it is
    ``unit_values(new) - unit_values(old)`` wherever a unit's state changed."""
    from geomstore.engine.nonlinear import Nonlinearity

    n_states = 3 if kind == "hardtanh" else 2
    spec = Nonlinearity(
        layer=0,
        node=None,
        name="u",
        kind=kind,  # type: ignore[arg-type]
        slope=torch.tensor([0.1, -0.4]) if kind == "prelu" else 0.2,
        lo=-0.3,
        hi=0.5,
        out_shape=(2, 3),
    )
    g = torch.Generator().manual_seed(0)
    vals = torch.randn((500, 3, 1), generator=g, dtype=torch.float64)
    vals[:7] = 0.0  # signed zeros must not matter
    units = torch.randint(0, 6, (500,), generator=g)
    old = torch.randint(0, n_states, (500,), generator=g, dtype=torch.uint8)
    new = (old + torch.randint(1, n_states, (500,), generator=g, dtype=torch.uint8)) % n_states
    want = spec.unit_values(vals, units, new) - spec.unit_values(vals, units, old)
    got = spec.unit_change(vals, units, new, old)
    assert torch.equal(got, want)
