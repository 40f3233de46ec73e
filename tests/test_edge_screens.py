"""The edge-boundary screens (boundary_edges), merge's _drop_rows and the GPU counts:
the screens never drop an edge the full test keeps, on the host and where the tensors
are, at every block size, and both ways to the edge test give one boundary table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from geomstore import Slice, partition
from geomstore.engine import boundary_edges as be

BOX = Slice.box((-1.0, -1.0), (1.0, 1.0))
_KEYS = ("a", "b", "left", "right", "amap", "cvec")


def _unscreened(monkeypatch: pytest.MonkeyPatch) -> None:
    """edge_boundary's full test on every inner edge (the screens keep everything)."""
    monkeypatch.setattr(be, "_near_tie", lambda amap, cvec, r, *a, **k: np.ones(len(r), bool))
    monkeypatch.setattr(be, "_near_level", lambda grad, *a, **k: np.ones(len(grad), bool))


def _same(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> None:
    assert x.keys() == y.keys()
    for key in x:
        np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


# --- defect: the tie screen's rounding margin is sized at the midpoint, not the ends ------


def _hexes(*values: str) -> list[float]:
    return [float.fromhex(v) for v in values]


def _rounding_case() -> dict[str, np.ndarray]:
    """One edge between regions 0 (left) and 1 (right), through (almost) the origin, lying
    on region 0's tie line of classes 0 and 1: the full test's values at both ends come
    out exactly 0.0 in float64, while the exact tie at the midpoint is off by ~1e-17 (the
    ends' products cancel, and their rounding, ~eps * |a|, is what is left). Class 1 wins
    just inside region 0, class 0 inside region 1: a class change along a tie."""
    g0 = _hexes("-0x1.c29aa5ca48cd4p-4", "-0x1.c8872ce346fd7p-2")
    g1 = _hexes("0x1.8cf73e7702137p-1", "0x1.8c8f60f9b08adp-3")
    a = np.array([_hexes("-0x1.a3b3cdb1cc974p-2", "0x1.228a0ad27626bp-1")])
    b = np.array([_hexes("0x1.a3b3cd79c37d4p-2", "-0x1.228a0ae6fe88bp-1")])
    cen = np.array(
        [
            _hexes("0x1.4c0b79b0c2c28p-4", "0x1.dfa8ea500f44fp-5"),
            _hexes("-0x1.4c0b7a90e72a8p-4", "-0x1.dfa8eb989564fp-5"),
        ]
    )
    c0 = float.fromhex("-0x1.2f7adf8000000p-29")
    amap = np.array([[g0, g1], [g0, g1]])
    cvec = np.array([[c0, 0.0], [1.0, 0.0]])
    return dict(a=a, b=b, left=np.array([0]), right=np.array([1]), cen=cen, amap=amap, cvec=cvec)


def test_tie_screen_rounding_margin_covers_the_edge_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tie screen's rounding margin is sized at the edge's ends, where the full test
    evaluates the tie (it was sized at the midpoint: an edge through the slice's centre
    then had only the exact 4 tol M of slack, and with a tolerance below float64's
    resolution of the ends, 1e-18 here, legal for partition(), the screen dropped an edge
    the full test accepts)."""
    case, tol = _rounding_case(), 1e-18
    t = {k: torch.as_tensor(case[k]) for k in _KEYS}
    cand = be.edge_candidates(
        t["a"], t["b"], t["left"], t["right"], t["amap"], t["cvec"], None, 0, tol
    )
    assert cand.tolist() == [0]  # the device screen keeps it
    screened = be.edge_boundary(**case, levels=None, output=0, tol=tol)
    kept = be._near_tie(case["amap"], case["cvec"], case["left"], case["a"], case["b"], tol)
    _unscreened(monkeypatch)
    full = be.edge_boundary(**case, levels=None, output=0, tol=tol)
    assert full["region"].tolist() == [1] and full["ca"].tolist() == [0]  # a boundary edge
    assert kept.all(), "_near_tie drops an edge that edge_boundary's full test keeps"
    _same(screened, full)


# --- the screens keep every edge the full test keeps (pins) -------------------------------


def _adversarial(
    seed: int,
    k: int,
    offset: float,
    slope_exp: float,
    tol: float,
    n_tie: int,
    centred: bool,
    length: float,
) -> dict[str, np.ndarray]:
    """Edges between region pairs whose tied classes (2 or more, exact ties included)
    meet along the edge within +-1.5 tolerances, other classes up to 10 below; slopes over
    2 slope_exp decades, some regions with all slopes 0 or two classes of equal slope,
    large common offsets, the right region's slopes sometimes perturbed."""
    rng = np.random.default_rng(seed)
    n = 120
    amap, cvec = np.zeros((2 * n, k, 2)), np.zeros((2 * n, k))
    a, b, cen = np.zeros((n, 2)), np.zeros((n, 2)), np.zeros((2 * n, 2))
    for e in range(n):
        g = rng.normal(size=(k, 2)) * 10.0 ** rng.uniform(-slope_exp, slope_exp)
        if rng.random() < 0.15:
            g[:] = 0.0
        if rng.random() < 0.2:
            g[1] = g[0]
        cls = rng.choice(k, min(n_tie, k), replace=False)
        grad = g[cls[0]] - g[cls[1]]
        ng = float(np.linalg.norm(grad))
        if ng == 0.0:
            grad, ng = np.array([1.0, 0.0]), 1.0
        tau = tol * ng
        d = np.array([-grad[1], grad[0]]) / ng
        mid = np.zeros(2) if centred else rng.uniform(-1, 1, 2)
        half = rng.uniform(0.05, 0.5) * length
        d = d + grad * rng.uniform(-1.0, 1.0) * tau / (half * ng * ng)
        d /= np.linalg.norm(d)
        a[e], b[e] = mid - half * d, mid + half * d
        c = -(g @ mid) + offset * rng.choice([-1.0, 1.0])
        for j in cls[1:]:
            c[j] += rng.uniform(-1.5, 1.5) * tau
        others = [j for j in range(k) if j not in cls]
        c[others] -= rng.uniform(0, 10, len(others)) * tau
        nrm = np.array([-d[1], d[0]])
        for r, side in ((2 * e, 1.0), (2 * e + 1, -1.0)):
            amap[r], cvec[r], cen[r] = g, c, mid + side * 0.1 * nrm
        if rng.random() < 0.5:
            amap[2 * e + 1] = g + rng.normal(size=g.shape) * 1e-3 * np.abs(g).max()
    right = np.arange(1, 2 * n, 2)
    right[::9] = -1  # some domain sides
    return dict(a=a, b=b, left=np.arange(0, 2 * n, 2), right=right, cen=cen, amap=amap, cvec=cvec)


@pytest.mark.parametrize(
    "cfg",
    [
        (2, 0.0, 3, 1e-6, 2, False, 1.0),  # K = 2, slopes over six decades
        (10, 0.0, 3, 1e-6, 3, False, 1.0),  # K = 10, three-way ties
        (3, 1e8, 2, 1e-10, 2, False, 1.0),  # huge common offset
        (5, 1e12, 1, 1e-8, 3, True, 1.0),  # huger offset, edges through the centre
        (4, 1e3, 3, 1e-12, 4, True, 50.0),  # four-way ties, long edges through the centre
    ],
)
def test_tie_screens_keep_every_edge_the_full_test_keeps(
    cfg: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIN. At partition-like tolerances (>= 1e-12 of the coordinates) both tie screens
    (_near_tie inside edge_boundary, and edge_candidates then edge_boundary, the GPU path)
    give exactly the full test's rows, for 2..10 classes, ties of 2..4 classes, equal
    slopes, zero slopes, offsets up to 1e12; and never pass a domain side."""
    k, offset, slope_exp, tol, n_tie, centred, length = cfg
    hits = 0
    for seed in range(3):
        case = _adversarial(seed, k, offset, slope_exp, tol, n_tie, centred, length)
        t = {q: torch.as_tensor(case[q]) for q in _KEYS}
        cand = be.edge_candidates(
            t["a"], t["b"], t["left"], t["right"], t["amap"], t["cvec"], None, 0, tol
        ).numpy()
        assert (case["right"][cand] >= 0).all()
        screened = be.edge_boundary(**case, levels=None, output=0, tol=tol)
        sub = {**case, **{q: case[q][cand] for q in ("a", "b", "left", "right")}}
        device = be.edge_boundary(**sub, levels=None, output=0, tol=tol)
        with monkeypatch.context() as mp:
            _unscreened(mp)
            full = be.edge_boundary(**case, levels=None, output=0, tol=tol)
        _same(screened, full)
        _same(device, full)
        hits += len(full["region"])
    assert hits >= 8  # the planted ties are real (10 to 53 per configuration)


def test_level_screens_with_several_levels_and_large_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PIN. Level sets with three levels up to 1e9 (outputs offset to match): both level
    screens keep exactly the full test's rows, on a 3-output map with output 2 traced."""
    from tests.test_boundary_edges import _planted_levels

    n = 300
    case, tol = _planted_levels(
        7, n, tol=1e-9, levels=(-3.0, 0.5, 1e9), k=3, spread=(1.5, 1.5), folds=True
    )
    levels = case.pop("levels")
    case.pop("output")
    t = {q: torch.as_tensor(case[q]) for q in _KEYS}
    cand = be.edge_candidates(
        t["a"], t["b"], t["left"], t["right"], t["amap"], t["cvec"], levels, 2, tol
    ).numpy()
    screened = be.edge_boundary(**case, levels=levels, output=2, tol=tol)
    sub = {**case, **{q: case[q][cand] for q in ("a", "b", "left", "right")}}
    device = be.edge_boundary(**sub, levels=levels, output=2, tol=tol)
    _unscreened(monkeypatch)
    full = be.edge_boundary(**case, levels=levels, output=2, tol=tol)
    assert 20 < len(full["region"]) < n and set(full["lv"]) <= set(levels)
    _same(screened, full)
    _same(device, full)


def test_edge_candidates_blocks_and_empty_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIN. edge_candidates in many small blocks (DEVICE_BLOCK 1, 3, 7) gives the one
    block's indices, ascending (with_edge_boundary relies on the order); levels=[], no
    inner edge, and one output without levels give an empty int64 index."""
    case = _adversarial(0, 4, 0.0, 2, 1e-6, 2, False, 1.0)
    t = {q: torch.as_tensor(case[q]) for q in _KEYS}
    args = (t["a"], t["b"], t["left"], t["right"], t["amap"], t["cvec"])
    lv_case = (*args[:4], t["amap"][:, :1], t["cvec"][:, :1])
    whole = be.edge_candidates(*args, None, 0, 1e-6)
    whole_lv = be.edge_candidates(*lv_case, [0.0, 0.3], 0, 1e-6)
    assert len(whole) > 0 and bool((whole[1:] > whole[:-1]).all())
    for block in (1, 3, 7):
        monkeypatch.setattr(be, "DEVICE_BLOCK", block)
        assert torch.equal(be.edge_candidates(*args, None, 0, 1e-6), whole)
        assert torch.equal(be.edge_candidates(*lv_case, [0.0, 0.3], 0, 1e-6), whole_lv)
    outside = torch.full_like(t["right"], -1)
    empties = [
        be.edge_candidates(*args, [], 0, 1e-6),
        be.edge_candidates(*args[:3], outside, *args[4:], None, 0, 1e-6),
        be.edge_candidates(*lv_case, None, 0, 1e-6),
        be.edge_candidates(*(x[:0] for x in args[:4]), *args[4:], None, 0, 1e-6),
    ]
    for got in empties:
        assert got.shape == (0,) and got.dtype == torch.int64


# --- end to end: the host path and the screen path give one boundary table ----------------


def _hinge_net(seed: int, k: int, level: tuple[int, float] | None = None) -> nn.Sequential:
    """2 -> 10 -> 10 -> k ReLU net with mirrored units (relu(z), relu(-z)) in both hidden
    layers and outputs c = out_0 + s_c (relu(z_j) - relu(-z_j)): classes 0 and c tie along
    the (bent) hinge z_j = 0, on edges. ``level`` (o, L): output o is instead
    s (relu(z_j) - relu(-z_j)) + L, whose level set L is that hinge. Weights on a coarse
    grid, so that the ties are exact."""
    rng = np.random.default_rng(seed)
    h = 5
    w1, b1 = np.round(rng.normal(size=(h, 2)) * 2) / 2, np.round(rng.normal(size=h) * 1.2) / 4
    w2, b2 = np.round(rng.normal(size=(h, 2 * h)) * 2) / 2, np.round(rng.normal(size=h)) / 4
    out, ob = np.round(rng.normal(size=(k, 2 * h)) * 2) / 2, np.zeros(k)
    for c in range(1, k):
        out[c], j, s = out[0], rng.integers(h), rng.choice([-1.0, 1.0, 0.5, 2.0])
        out[c, j] += s
        out[c, h + j] -= s
    if level is not None:
        o, j = level[0], rng.integers(h)
        out[o], ob[o] = 0.0, level[1]
        out[o, j], out[o, h + j] = 1.5, -1.5
    net = nn.Sequential(
        nn.Linear(2, 2 * h), nn.ReLU(), nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, k)
    ).double()
    layers = ((np.r_[w1, -w1], np.r_[b1, -b1]), (np.r_[w2, -w2], np.r_[b2, -b2]), (out, ob))
    with torch.no_grad():
        for lin, (w, bias) in zip((net[0], net[2], net[4]), layers, strict=True):
            lin.weight.copy_(torch.tensor(w))
            lin.bias.copy_(torch.tensor(bias))
    return net.eval()


def _boundary(part: Any) -> dict[str, np.ndarray]:
    bd = part.boundary
    cols = [c for c in bd.column_names if c != "geometry"]
    return {c: np.asarray(bd.column(c).to_numpy(zero_copy_only=False)) for c in cols}


def _same_table(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> None:
    assert x.keys() == y.keys()
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize(
    ("seed", "k", "level", "kw"),
    [
        (1, 3, None, {}),
        (3, 4, None, {}),
        (2, 1, (0, 0.0), {}),  # one output: the threshold's level set
        (3, 3, (1, 0.25), {"levels": [0.0, 0.25, -0.5], "output": 1}),
        (4, 2, None, {"levels": []}),
    ],
)
def test_host_and_screen_paths_give_one_boundary_table(
    seed: int, k: int, level: tuple | None, kw: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIN. Planted hinge ties: the boundary table is the same, row for row and bit for
    bit, with all edges tested on the host (small CPU partition), with the device screen
    (SCREEN_FROM = 0) in small blocks (DEVICE_BLOCK = 3, EDGE_BLOCK = 5, so that regions
    are renumbered per block), and with both screens off; and edges add boundary."""

    def run(**patch: Any) -> dict[str, np.ndarray]:
        with monkeypatch.context() as mp:
            for name, value in patch.items():
                if name == "off":
                    _unscreened(mp)
                else:
                    mp.setattr(be, name, value)
            return _boundary(partition(net, BOX, device="cpu", **kw))

    net = _hinge_net(seed, k, level)
    host = run()
    screen = run(SCREEN_FROM=0, DEVICE_BLOCK=3, EDGE_BLOCK=5)
    full = run(off=True)
    _same_table(host, full)
    _same_table(screen, full)
    keys = ("a", "b", "region", "ca", "cb", "lv")
    empty = {q: np.zeros((0, 2)) if q in ("a", "b") else np.zeros(0) for q in keys}
    with monkeypatch.context() as mp:
        mp.setattr(be, "edge_boundary", lambda *a, **kw_: empty)
        interior = _boundary(partition(net, BOX, device="cpu", **kw))
    if kw.get("levels") == []:
        assert len(full["region_id"]) == 0
    else:
        assert len(full["region_id"]) > len(interior["region_id"])  # edges added boundary


# --- merge: glued rows dropped from several packed chunks ---------------------------------


def test_glued_rows_dropped_across_packed_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIN. A max-pool CNN at a 16 MiB budget leaves its patterns in 3 packed chunks and
    glues pieces in every one of them: the chunks _drop_rows leaves hold the same
    patterns, in the same order, as indexing their concatenation (the former code)."""
    from geomstore.engine import merge
    from tests.nets import SmallCNN, digits_slice

    seen: dict[str, Any] = {}
    real = merge._drop_rows

    def spy(chunks: list[np.ndarray], gone: np.ndarray) -> list[np.ndarray]:
        bounds = np.cumsum([0] + [len(c) for c in chunks])
        seen["chunks"] = len(chunks)
        seen["hit"] = len(set(np.searchsorted(bounds, gone, side="right").tolist()))
        return real(chunks, gone)

    def former(chunks: list[np.ndarray], gone: np.ndarray) -> list[np.ndarray]:
        whole = np.concatenate(chunks)
        keep = np.ones(len(whole), dtype=bool)
        keep[gone] = False
        return [whole[keep]]

    net, sl = SmallCNN().eval(), digits_slice()
    monkeypatch.setattr(merge, "_drop_rows", spy)
    new = partition(net, sl, memory="16MiB")
    assert seen["chunks"] >= 2 and seen["hit"] >= 2  # rows go from several chunks
    monkeypatch.setattr(merge, "_drop_rows", former)
    old = partition(net, sl, memory="16MiB")
    assert new.regions.column("pattern").equals(old.regions.column("pattern"))
    np.testing.assert_array_equal(new.states, old.states)
    assert len(new.states) == new.n_regions
