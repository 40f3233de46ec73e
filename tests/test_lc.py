"""Local complexity as the papers count it: the estimators against each other and against
independent counts (a numpy forward pass over the 2P vertices; shapely on the regions)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import numpy as np
import pytest
import shapely
import torch
from torch import nn
from typer.testing import CliRunner

import geomstore
from geomstore.cli import app
from geomstore.errors import GeomstoreError
from geomstore.queries import approximate_lc, lc_trajectory, local_complexity
from tests.nets import BOX, mlp

SEEDS = (10, 6)


# -- the input-space estimator against a brute-force count over the vertices --------------------
def _weights(net: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    lin = [m for m in net if isinstance(m, nn.Linear)]
    return [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in lin]


def _brute_force(
    net: nn.Sequential, x: np.ndarray, r: float, dirs: np.ndarray, layers: str, zero: str
) -> np.ndarray:
    """Per point and layer: units whose sign differs among the vertices x +/- r v_i (numpy)."""
    v = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    h = x[:, None, :] + r * np.concatenate([v, -v])[None]  # (n, 2P, d)
    weights = _weights(net)
    counts = []
    for i, (w, b) in enumerate(weights):
        z = h @ w.T + b
        if i == len(weights) - 1 and layers == "hidden":
            break
        s = np.sign(z) if zero == "own_state" else (z > 0)
        counts.append((s != s[:, :1]).any(axis=1).sum(axis=1))
        h = np.maximum(z, 0)
    return np.stack(counts, 1)


@pytest.fixture(scope="module")
def wide() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    ).eval()


@pytest.mark.parametrize("layers", ["hidden", "all"])
@pytest.mark.parametrize("zero", ["off", "own_state"])
@pytest.mark.parametrize(("r", "p"), [(0.05, 4), (0.5, 10), (0.5, 4)])
def test_approximate_lc_equals_a_brute_force_count(
    wide: nn.Sequential, layers: str, zero: str, r: float, p: int
) -> None:
    rng = np.random.default_rng(p)
    x = rng.normal(size=(50, 10))
    dirs = np.linalg.qr(rng.normal(size=(10, p)))[0].T
    # batch of 7 points: the last chunk is partial and must be counted (the reference drops it)
    got = approximate_lc(
        wide, x, radius=r, directions=dirs, layers=layers, zero=zero, batch=7 * 2 * p
    )  # type: ignore[arg-type]
    per_layer = np.array(got.column("neurons_per_layer").to_pylist())
    want = _brute_force(wide, x, r, dirs, layers, zero)
    assert per_layer.shape == (50, 3 if layers == "all" else 2)
    np.testing.assert_array_equal(per_layer, want)
    np.testing.assert_array_equal(got.column("n_neurons").to_numpy(), want.sum(1))
    assert want[-1].sum() > 0 and want[:, -1].sum() > 0  # the last point and the last layer


def test_all_counts_the_logits_on_top_of_the_hidden_units(wide: nn.Sequential) -> None:
    x = np.random.default_rng(0).normal(size=(50, 10))
    hid = approximate_lc(wide, x, radius=0.5, directions=10, seed=1)
    full = approximate_lc(wide, x, radius=0.5, directions=10, seed=1, layers="all")
    h = np.array(hid.column("neurons_per_layer").to_pylist())
    f = np.array(full.column("neurons_per_layer").to_pylist())
    np.testing.assert_array_equal(f[:, :2], h)
    assert f[:, 2].sum() > 0  # at r = 0.5 some logits change sign (the 12-19 extra)
    again = approximate_lc(wide, x, radius=0.5, directions=10, seed=1, layers="all")
    assert again.equals(full)  # the random directions are reproducible from the seed


def test_an_exact_zero_is_its_own_state_only_when_asked() -> None:
    # x = (0.5, 0.25), r = 0.25, directions e1, e2; dyadic numbers keep every value exact.
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        net[0].bias.copy_(torch.tensor([-0.75, -0.5]))  # unit 0 is exactly 0 at x + r e1
        net[2].weight.copy_(torch.tensor([[0.0, 4.0]]))
        net[2].bias.copy_(torch.tensor([-1.0]))  # the logit is exactly 0 at x + r e1
    x = np.array([[0.5, 0.25]])
    want = {
        ("hidden", "off"): [1],
        ("hidden", "own_state"): [2],
        ("all", "off"): [1, 0],
        ("all", "own_state"): [2, 1],
    }
    for (layers, zero), counts in want.items():
        got = approximate_lc(net, x, radius=0.25, directions=np.eye(2), layers=layers, zero=zero)  # type: ignore[arg-type]
        assert got.column("neurons_per_layer").to_pylist() == [counts], (layers, zero)
        assert _brute_force(net, x, 0.25, np.eye(2), layers, zero).tolist() == [counts]


# -- the exact slice LC against the approximate one (2 inputs, P = 2: the L1 diamond) -----------
@pytest.fixture(scope="module")
def nets() -> list[nn.Sequential]:
    return [mlp((24, 24), 3, seed=s) for s in SEEDS]


@pytest.fixture(scope="module")
def parts(nets: list[nn.Sequential]) -> list[geomstore.Partition]:
    return [geomstore.partition(n, BOX, device="cpu") for n in nets]


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, parts: list[geomstore.Partition]
) -> Iterator[geomstore.Store]:
    with geomstore.open(tmp_path_factory.mktemp("lc") / "s") as s:
        for step, p in zip((0, 100), parts, strict=True):
            s.add(p, model="net", checkpoint=f"step{step}", step=step)
        yield s


@pytest.mark.parametrize("layers", ["hidden", "all"])
@pytest.mark.parametrize("r", [0.1, 0.3])
def test_exact_diamond_lc_bounds_the_approximate_one(
    store: geomstore.Store, nets: list[nn.Sequential], layers: str, r: float
) -> None:
    np.testing.assert_allclose(BOX.basis @ BOX.basis.T, np.eye(2))  # slice axes orthonormal
    u = np.random.default_rng(int(r * 10)).uniform(-0.6, 0.6, (120, 2))  # diamonds in the box
    exact = local_complexity(store, model="net", points=u, radius=r, shape="diamond", layers=layers)  # type: ignore[arg-type]
    ex = np.array(exact.column("neurons_per_layer").to_pylist()).reshape(2, len(u), -1)
    n_layers = 3 if layers == "all" else 2
    assert ex.shape[2] == n_layers
    for k, net in enumerate(nets):
        approx = approximate_lc(net, BOX.lift(u), radius=r, directions=BOX.basis, layers=layers)  # type: ignore[arg-type]
        ap = np.array(approx.column("neurons_per_layer").to_pylist())
        # a unit whose state differs at two vertices has a zero on the segment between them,
        # inside the diamond: approximate <= exact, for every point and every layer
        assert (ex[k] >= ap).all()
        # a first-layer zero set is a line: it meets the diamond iff the vertices disagree
        np.testing.assert_array_equal(ex[k][:, 0], ap[:, 0])
        assert ap[:, 0].sum() > 0 and ap[:, 1].sum() > 0 and ap[:, -1].sum() > 0
    assert (ex[..., 1:] > 0).any()


# -- the logits' zero sets on the slice against shapely ----------------------------------------
def _logit_reference(part: geomstore.Partition, u: np.ndarray, r: float) -> np.ndarray:
    """Per point: output units whose zero line, clipped to each region, meets the diamond."""
    amap, cvec = part.affine_maps()
    polys = part.polygons()
    k = cvec.shape[1]
    hits = np.zeros((len(u), k), dtype=bool)
    hoods = [
        shapely.Polygon([(p[0] + r, p[1]), (p[0], p[1] + r), (p[0] - r, p[1]), (p[0], p[1] - r)])
        for p in u
    ]
    for j in range(k):
        a, c = amap[:, j], cvec[:, j]
        n2 = (a * a).sum(1)
        base = -c[:, None] * a / n2[:, None]
        along = np.stack([-a[:, 1], a[:, 0]], 1) / np.sqrt(n2)[:, None] * 10.0
        lines = shapely.linestrings(np.stack([base - along, base + along], 1))
        pieces = shapely.intersection(lines, polys)
        pieces = pieces[shapely.length(pieces) > 0]
        for i, hood in enumerate(hoods):
            hits[i, j] = bool((shapely.length(shapely.intersection(pieces, hood)) > 1e-12).any())
    return hits.sum(1)


def test_the_logits_zero_sets_match_shapely(
    store: geomstore.Store, parts: list[geomstore.Partition]
) -> None:
    for part in parts:  # the claim of the docs: stored edges hold hidden units only
        units = part.edges.column("unit").to_numpy(zero_copy_only=False)
        assert np.nanmax(units.astype(float)) < 48
    u = np.random.default_rng(5).uniform(-0.9, 0.9, (40, 2))
    r = 0.2
    full = local_complexity(store, model="net", points=u, radius=r, shape="diamond", layers="all")
    hid = local_complexity(store, model="net", points=u, radius=r, shape="diamond")
    f = np.array(full.column("neurons_per_layer").to_pylist()).reshape(2, len(u), 3)
    h = np.array(hid.column("neurons_per_layer").to_pylist()).reshape(2, len(u), 2)
    np.testing.assert_array_equal(f[..., :2], h)
    assert full.column("n_regions").equals(hid.column("n_regions"))
    for k, part in enumerate(parts):
        want = _logit_reference(part, u, r)
        np.testing.assert_array_equal(f[k, :, 2], want)
        assert want.sum() > 0
    extra = np.asarray(full.column("boundary_density")) - np.asarray(hid.column("boundary_density"))
    assert (extra >= -1e-9).all() and extra.max() > 0


def test_trajectory_takes_the_layers_choice(store: geomstore.Store) -> None:
    u = np.random.default_rng(2).uniform(-0.8, 0.8, (30, 2))
    hid, _ = lc_trajectory(store, model="net", points=u, radius=0.3)
    full, turns = lc_trajectory(store, model="net", points=u, radius=0.3, layers="all")
    assert full.num_rows == hid.num_rows == 2
    lo, hi = hid.column("lc_mean").to_pylist(), full.column("lc_mean").to_pylist()
    assert all(b >= a for a, b in zip(lo, hi, strict=True)) and sum(hi) > sum(lo)
    assert set(turns) == {"all"}


# -- choices and bad input: one line naming the problem and the fix ----------------------------
def test_choices_are_validated_with_the_list(store: geomstore.Store, wide: nn.Sequential) -> None:
    pts = np.zeros((1, 2))
    with pytest.raises(ValueError, match=r"layers must be one of \('hidden', 'all'\)"):
        local_complexity(store, model="net", points=pts, radius=0.1, layers="logits")  # type: ignore[arg-type]
    with pytest.raises(GeomstoreError, match=r"shape must be one of \('disk', 'diamond'\)"):
        local_complexity(store, model="net", points=pts, radius=0.1, shape="ball")  # type: ignore[arg-type]
    for bad in (0.0, -1.0, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="radius must be a finite number > 0"):
            local_complexity(store, model="net", points=pts, radius=bad)  # type: ignore[arg-type]
    x = np.zeros((2, 10))
    cases: list[tuple[dict[str, object], str]] = [
        ({"layers": "output"}, r"layers must be one of \('hidden', 'all'\)"),
        ({"zero": "sign"}, r"zero must be one of \('off', 'own_state'\)"),
        ({"directions": 0}, r"directions must lie in \[1, 10\]"),
        ({"directions": 11}, r"directions must lie in \[1, 10\]"),
        ({"directions": np.zeros((2, 10))}, "non-zero"),
        ({"directions": np.ones((2, 3))}, "directions of size 10"),
        ({"directions": np.full((1, 10), np.nan)}, "finite array"),
        ({"radius": -0.5}, "radius must be a finite number > 0"),
        ({"batch": 0}, "batch must be a positive integer"),
    ]
    for kw, msg in cases:
        args: dict[str, object] = {"radius": 0.1} | kw
        with pytest.raises(ValueError, match=msg):
            approximate_lc(wide, x, **args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite inputs"):
        approximate_lc(wide, np.full((2, 10), np.inf), radius=0.1)


def test_cli_lc_takes_layers(store: geomstore.Store) -> None:
    x = np.random.default_rng(4).uniform(-0.8, 0.8, (20, 2))
    store.add_points("cli-probe", BOX, x)
    want, _ = lc_trajectory(store, model="net", points="cli-probe", radius=0.2, layers="all")
    runner = CliRunner()
    args = ["lc", str(store.target), "--model", "net", "--points", "cli-probe", "--radius", "0.2"]
    res = runner.invoke(app, [*args, "--format", "csv", "--layers", "all"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.output)))
    assert [float(r["lc_mean"]) for r in rows] == want.column("lc_mean").to_pylist()
    # main() prints a GeomstoreError as "Error: <message>" (tests/test_commands.py)
    bad = runner.invoke(app, [*args, "--layers", "logits"])
    assert bad.exit_code == 1 and isinstance(bad.exception, GeomstoreError)
    assert str(bad.exception) == "layers must be one of ('hidden', 'all'); got 'logits'."


def test_batches_and_the_sorted_path_agree_with_one_bitmap(
    store: geomstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from geomstore.queries import complexity

    u = np.random.default_rng(7).uniform(-1, 1, (60, 2))
    one = local_complexity(store, model="net", points=u, radius=0.25, layers="all")
    monkeypatch.setattr(complexity, "_BATCH", 97)  # many small batches
    monkeypatch.setattr(complexity, "_BITMAP_MAX", 0)  # distinct units by sorting
    monkeypatch.setattr(complexity, "_CANDIDATES", 100)  # candidates expanded in pieces
    many = local_complexity(store, model="net", points=u, radius=0.25, layers="all")
    for name in ("checkpoint", "step", "point_id", "n_neurons", "neurons_per_layer", "n_regions"):
        assert many.column(name).equals(one.column(name)), name
    np.testing.assert_allclose(
        np.asarray(many.column("boundary_density")),
        np.asarray(one.column("boundary_density")),
        rtol=1e-12,
    )


def test_a_radius_that_covers_the_domain_counts_every_unit(
    store: geomstore.Store, parts: list[geomstore.Partition]
) -> None:
    u = np.random.default_rng(8).uniform(-1, 1, (7, 2))
    lc = local_complexity(store, model="net", points=u, radius=3.0)
    for k, part in enumerate(parts):
        units = part.edges.column("unit").drop_null().to_numpy()
        got = lc.column("n_neurons").to_numpy()[k * len(u) : (k + 1) * len(u)]
        assert (got == len(np.unique(units))).all()
        assert (
            lc.column("n_regions").to_numpy()[k * len(u) : (k + 1) * len(u)] == part.n_regions
        ).all()
