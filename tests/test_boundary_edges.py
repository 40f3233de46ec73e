"""Decision boundary that lies on an edge between regions (a tie along a ReLU hinge)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from geomstore import Slice, partition

BOX = Slice.box((-1.0, -1.0), (1.0, 1.0))


@pytest.fixture(params=["host", "screen"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways to the edge test on the CPU: all edges on the host (small partitions),
    or screened with tensor operations first (as on a GPU, or past SCREEN_FROM edges)."""
    from geomstore.engine import boundary_edges

    if request.param == "screen":
        monkeypatch.setattr(boundary_edges, "SCREEN_FROM", 0)
    return str(request.param)


def _net(out_w: list[list[float]], out_b: list[float]) -> nn.Sequential:
    """Hidden units relu(u0), relu(-u0), relu(u1 + 0.5); outputs given by hand."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, len(out_b))).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
        net[2].weight.copy_(torch.tensor(out_w))
        net[2].bias.copy_(torch.tensor(out_b))
    return net.eval()


def _segments(part: object) -> np.ndarray:
    bd = part.boundary  # type: ignore[attr-defined]
    return np.stack([np.asarray(bd.column(c)) for c in ("u0_a", "u1_a", "u0_b", "u1_b")], 1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_tie_along_a_hinge_is_boundary(sign: float, path: str) -> None:
    # logits +-(relu(u0) - relu(-u0)) = +-u0: the classes swap exactly on the hinge u0 = 0
    net = _net([[sign, -sign, 0.0], [-sign, sign, 0.0]], [0.0, 0.0])
    part = partition(net, BOX, device="cpu")
    seg = _segments(part)
    assert len(seg) >= 1 and np.allclose(seg[:, [0, 2]], 0.0, atol=1e-12)
    assert np.isclose(np.abs(seg[:, 3] - seg[:, 1]).sum(), 2.0)  # the whole hinge, once
    bd = part.boundary
    assert set(bd.column("class_a").to_pylist()) == {0}
    assert set(bd.column("class_b").to_pylist()) == {1}
    # each segment's normal points towards class_b
    probe = torch.tensor([[0.5, 0.0], [-0.5, 0.0]], dtype=torch.float64)
    right_class = int(net(probe)[0].argmax())
    normal_u0 = np.asarray(bd.column("normal_u0"))
    assert ((normal_u0 > 0) == (right_class == 1)).all()
    report = part.verify(net, grid=32)
    assert report.ok and any(c.name == "decision boundary" for c in report.checks), str(report)


def test_a_touching_tie_without_a_class_change_is_not_boundary(path: str) -> None:
    # logit0 - logit1 = |u0| >= 0: a tie on the hinge, but class 0 wins on both sides
    net = _net([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [0.0, 0.0])
    part = partition(net, BOX, device="cpu")
    assert part.boundary.num_rows == 0
    assert part.verify(net, grid=32).ok


def test_three_classes_and_a_level_set_on_a_hinge(path: str) -> None:
    # class 2 is never on top; 0 and 1 swap on u0 = 0, and the hinge u1 = -0.5 is no boundary
    net = _net([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, -0.5]], [0.0, 0.0, -3.0])
    part = partition(net, BOX, device="cpu")
    seg = _segments(part)
    assert np.allclose(seg[:, [0, 2]], 0.0, atol=1e-12)
    assert np.isclose(np.abs(seg[:, 3] - seg[:, 1]).sum(), 2.0)
    assert part.verify(net, grid=32).ok
    # one output: its zero level set is the hinge u0 = 0
    one = _net([[1.0, -1.0, 0.0]], [0.0])
    lv = partition(one, BOX, device="cpu")
    seg = _segments(lv)
    assert np.allclose(seg[:, [0, 2]], 0.0, atol=1e-12)
    assert np.isclose(np.abs(seg[:, 3] - seg[:, 1]).sum(), 2.0)
    assert lv.verify(one, grid=32).ok


def test_random_networks_gain_no_edge_boundary(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On generic weights no tie holds along an edge: the device screen leaves no edge
    for the full test, and the table is the interior pass's."""
    from geomstore.engine import boundary_edges as part_mod

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    net = net.double().eval()
    screened: list[int] = []
    tested: list[int] = []
    real_screen, real_test = part_mod.edge_candidates, part_mod.edge_boundary

    def screen(*args: object, **kwargs: object) -> torch.Tensor:
        out = real_screen(*args, **kwargs)  # type: ignore[arg-type]
        screened.append(len(out))
        return out

    def test(*args: object, **kwargs: object) -> dict[str, np.ndarray]:
        out = real_test(*args, **kwargs)  # type: ignore[arg-type]
        tested.append(len(out["region"]))
        return out

    monkeypatch.setattr(part_mod, "edge_candidates", screen)
    monkeypatch.setattr(part_mod, "edge_boundary", test)
    part = partition(net, Slice.box((-3.0, -3.0), (3.0, 3.0)), device="cpu")
    # the screen leaves nothing for the full test; the host tests every edge and finds none
    assert screened == ([0] if path == "screen" else [])
    assert tested == ([] if path == "screen" else [0]) and part.boundary.num_rows > 0
    assert part.verify(net, grid=48).ok


def _planted_ties(seed: int, n: int = 400, k: int = 5) -> tuple[dict, float]:
    """Edges between region pairs whose top two classes tie along the edge within a
    fraction of the tolerance (some just past it), at slopes from 1e-3 to 1e3."""
    rng = np.random.default_rng(seed)
    tol = 1e-6
    amap = np.zeros((2 * n, k, 2))
    cvec = np.zeros((2 * n, k))
    a = np.zeros((n, 2))
    b = np.zeros((n, 2))
    cen = np.zeros((2 * n, 2))
    for e in range(n):
        g = rng.normal(size=(k, 2)) * 10.0 ** rng.uniform(-3, 3)
        c1, c2 = rng.choice(k, 2, replace=False)
        grad = g[c1] - g[c2]
        tau = tol * np.linalg.norm(grad)
        perp = np.array([-grad[1], grad[0]]) / np.linalg.norm(grad)
        mid = rng.uniform(-1, 1, 2)
        half = rng.uniform(0.05, 0.5)
        # the tie line's value at the ends: within +-0.95 tau (hit), or up to 1.5 tau (miss)
        along, off = rng.uniform(-0.5, 0.5) * tau, rng.uniform(-1.0, 1.0) * tau
        d = perp + grad * along / (half * np.dot(grad, grad))
        d /= np.linalg.norm(d)
        a[e], b[e] = mid - half * d, mid + half * d
        c = -(g @ mid)  # every class 0 at the midpoint ...
        c[c1] += off  # ... the tied pair off by at most tau, the rest up to 8 tau below
        others = [j for j in range(k) if j not in (c1, c2)]
        c[others] -= rng.uniform(0.0, 8.0, len(others)) * tau
        nrm = np.array([-d[1], d[0]])
        for r, side in ((2 * e, 1.0), (2 * e + 1, -1.0)):
            amap[r], cvec[r], cen[r] = g, c, mid + side * 0.1 * nrm
    left, right = np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2)
    return dict(a=a, b=b, left=left, right=right, cen=cen, amap=amap, cvec=cvec), tol


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_edge_screen_keeps_every_boundary_edge(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """edge_boundary drops edges whose top two outputs are far apart before its full test;
    planted ties at the tolerance's edge, at slopes over six decades, come out the same as
    with the screen off."""
    from geomstore.engine import boundary_edges as tables

    case, tol = _planted_ties(seed)
    screened = tables.edge_boundary(**case, levels=None, output=0, tol=tol)
    kept = tables._near_tie(case["amap"], case["cvec"], case["left"], case["a"], case["b"], tol)
    # the screen is tight enough to matter: classes 0.1 apart (over 30 tolerances at the
    # steepest slopes here) are all dropped
    far = case["cvec"] - np.arange(case["cvec"].shape[1]) * 0.1
    assert not tables._near_tie(case["amap"], far, case["left"], case["a"], case["b"], tol).any()
    monkeypatch.setattr(tables, "_near_tie", lambda amap, cvec, r, *rest: np.ones(len(r), bool))
    full = tables.edge_boundary(**case, levels=None, output=0, tol=tol)
    n_hit = len(full["region"])
    assert 0.2 * len(case["a"]) < n_hit < len(case["a"])  # hits and misses both planted
    for key in full:
        np.testing.assert_array_equal(screened[key], full[key])
    assert kept.all()  # every planted pair is near a tie


def _planted_levels(
    seed: int,
    n: int = 400,
    *,
    tol: float = 1e-6,
    levels: tuple[float, ...] = (0.0, 2.5),
    k: int = 1,
    spread: tuple[float, float] = (0.5, 1.0),
    folds: bool = False,
) -> tuple[dict, float]:
    """Edges along which output ``k - 1`` sits within ``spread[1]`` tolerances of one of
    the levels at the midpoint (and drifts by ``spread[0]`` along the edge; some end just
    past the tolerance), at slopes over six decades; the other outputs random. ``folds``:
    every other edge's far side has the slope reversed (the output touches the level and
    turns back: no boundary)."""
    rng = np.random.default_rng(seed)
    if k > 1:
        amap, cvec = rng.normal(size=(2 * n, k, 2)), rng.normal(size=(2 * n, k))
    else:
        amap, cvec = np.zeros((2 * n, 1, 2)), np.zeros((2 * n, 1))
    a, b, cen = np.zeros((n, 2)), np.zeros((n, 2)), np.zeros((2 * n, 2))
    for e in range(n):
        g = rng.normal(size=2) * 10.0 ** rng.uniform(-3, 3)
        tau = tol * np.linalg.norm(g)
        perp = np.array([-g[1], g[0]]) / np.linalg.norm(g)
        mid, half = rng.uniform(-1, 1, 2), rng.uniform(0.05, 0.5)
        d = perp + g * rng.uniform(-spread[0], spread[0]) * tau / (half * np.dot(g, g))
        d /= np.linalg.norm(d)
        a[e], b[e] = mid - half * d, mid + half * d
        c = levels[e % len(levels)] - g @ mid + rng.uniform(-spread[1], spread[1]) * tau
        nrm = np.array([-d[1], d[0]])
        for r, side in ((2 * e, 1.0), (2 * e + 1, -1.0)):
            amap[r, k - 1], cvec[r, k - 1], cen[r] = g, c, mid + side * 0.1 * nrm
        if folds and e % 2:
            amap[2 * e + 1, k - 1] *= -1.0
    case = dict(a=a, b=b, left=np.arange(0, 2 * n, 2), right=np.arange(1, 2 * n, 2))
    case |= dict(cen=cen, amap=amap, cvec=cvec, levels=list(levels), output=k - 1)
    return case, tol


@pytest.mark.parametrize("seed", [0, 1])
def test_the_level_screen_keeps_every_level_set_edge(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Level sets: planted edges at the tolerance's edge come out the same with
    edge_boundary's screen on and off."""
    from geomstore.engine import boundary_edges as tables

    case, tol = _planted_levels(seed)
    screened = tables.edge_boundary(**case, tol=tol)
    monkeypatch.setattr(tables, "_near_level", lambda grad, *rest: np.ones(len(grad), bool))
    full = tables.edge_boundary(**case, tol=tol)
    n = len(case["a"])
    assert 0.2 * n < len(full["region"]) < n  # hits and misses both planted
    for key in full:
        np.testing.assert_array_equal(screened[key], full[key])


@pytest.mark.parametrize("kind", ["ties", "levels"])
def test_the_device_screen_keeps_every_boundary_edge(kind: str) -> None:
    """edge_candidates (the screen a GPU runs before the host's full test) keeps every edge
    that carries boundary: the full test on its candidates alone gives the full answer.
    Domain sides (region -1) are never candidates."""
    from geomstore.engine import boundary_edges

    case, tol = _planted_ties(0) if kind == "ties" else _planted_levels(0)
    levels = case.pop("levels", None)
    case.pop("output", None)
    case["right"] = case["right"].copy()
    case["right"][::7] = -1  # edges on the domain's side
    full = boundary_edges.edge_boundary(**case, levels=levels, output=0, tol=tol)
    t = {k: torch.as_tensor(case[k]) for k in ("a", "b", "left", "right", "amap", "cvec")}
    cand = boundary_edges.edge_candidates(
        t["a"], t["b"], t["left"], t["right"], t["amap"], t["cvec"], levels, 0, tol
    ).numpy()
    assert len(full["region"]) > 50 and not (case["right"][cand] < 0).any()
    sub = {**case, "a": case["a"][cand], "b": case["b"][cand]}
    sub |= {"left": case["left"][cand], "right": case["right"][cand]}
    got = boundary_edges.edge_boundary(**sub, levels=levels, output=0, tol=tol)
    for key in full:
        np.testing.assert_array_equal(got[key], full[key])
    # and it screens: with the outputs pulled apart no edge is left
    far = case["cvec"] - np.arange(case["cvec"].shape[1]) * 0.1 - 0.1 * (kind == "levels")
    none = boundary_edges.edge_candidates(
        t["a"], t["b"], t["left"], t["right"], t["amap"], torch.as_tensor(far), levels, 0, tol
    )
    assert len(none) == 0


@pytest.mark.parametrize("centre", [0.0, 1e6 + 0.3])
def test_a_segment_on_an_edge_has_the_edges_coordinates(centre: float, path: str) -> None:
    """Far from the origin too, a boundary segment that lies on an edge is that edge: the
    same float64 coordinates as the edges table's row, on both ways to the edge test."""
    net = _net([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]], [0.0, 0.0])
    shifted = nn.Sequential(nn.Linear(2, 2), net).double().eval()
    with torch.no_grad():  # the hinge u0 = 0 of net is x0 = centre here
        shifted[0].weight.copy_(torch.eye(2))
        shifted[0].bias.copy_(torch.tensor([-centre, 0.0]))
    box = Slice.box((centre - 0.7, -1.0), (centre + 1.3, 1.0))
    part = partition(shifted, box, device="cpu")
    seg = {tuple(r) for r in _segments(part)}
    e = part.edges
    cols = [np.asarray(e.column(c)) for c in ("u0_a", "u1_a", "u0_b", "u1_b")]
    edges = {tuple(r) for r in np.stack(cols, 1)}
    assert len(seg) >= 1 and seg <= edges
    assert np.isclose(sum(abs(s[3] - s[1]) for s in seg), 2.0)
