"""The partition must be exact: each test here fails on a wrong partition."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import torch
from torch import nn

from geomstore import (
    GeomstoreError,
    ModelShapeError,
    Slice,
    UnsupportedModelError,
    partition,
)
from geomstore.engine import partition as partition_mod
from geomstore.engine.reference import reference_regions
from tests.nets import BOX, ConvKinds, Residual, SmallCNN, digits_slice, mlp

NETWORKS = {
    "relu-1-out": lambda: mlp((12, 10), 1),
    "relu-3-class": lambda: mlp((16, 16), 3, seed=1),
    "relu-deep": lambda: mlp((8, 8, 8, 8), 2, seed=2),
    "leaky": lambda: mlp((12, 12), 3, act=nn.LeakyReLU, negative_slope=0.2),
    "prelu": lambda: mlp((10, 10), 2, act=nn.PReLU, seed=3),
    "relu6": lambda: mlp((10, 10), 2, act=nn.ReLU6, seed=4),
    "hardtanh": lambda: mlp((10, 10), 3, act=nn.Hardtanh, seed=5, min_val=-0.3, max_val=0.4),
    "residual-concat": lambda: Residual(),
}


def _check(part: object, model: nn.Module) -> None:
    report = part.verify(model)  # type: ignore[attr-defined]
    assert report.ok, str(report)
    names = {c.name for c in report.checks}
    assert {"tiling", "affine maps", "patterns at centroids", "patterns on grid"} <= names


CHILDREN = ["rank-1 updates", "dense products"]


def _children(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Compute children's inputs always by rank-1 updates of their cell, or always densely."""
    from geomstore.engine.descent import Descent

    monkeypatch.setattr(Descent, "rank1_limit", 1 << 30 if how == CHILDREN[0] else 0)


@pytest.mark.parametrize("children", CHILDREN)
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_partition_is_exact(name: str, children: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _children(monkeypatch, children)
    model = NETWORKS[name]()
    part = partition(model, BOX, device="cpu")
    assert part.n_regions > 20
    _check(part, model)


def test_edges_lie_on_their_neurons_zero_sets() -> None:
    # every interior edge lies where its neuron's pre-activation meets its threshold
    # (0, or hard-tanh's bounds); float32 bounds once put them 1e-8 off
    model = mlp((10, 10), 3, act=nn.Hardtanh, seed=5, min_val=-0.3, max_val=0.4)
    part = partition(model, BOX, device="cpu")
    edges = part.edges.to_pydict()
    geoms = shapely.from_wkb(part.edges.column("geometry").to_numpy(zero_copy_only=False))
    ends = shapely.get_coordinates(geoms).reshape(-1, 2, 2)
    inner = np.array([v is not None for v in edges["layer"]])  # border edges: null
    assert inner.sum() > 50
    x = torch.as_tensor(ends[inner].reshape(-1, 2))
    assert part.program is not None
    _, pres = part.program.forward_with_pre(x)
    layer = np.repeat(np.array(edges["layer"])[inner].astype(int), 2)
    neuron = np.repeat(np.array(edges["neuron"])[inner].astype(int), 2)
    pre = np.stack([p.detach().numpy() for p in pres])[layer, np.arange(len(layer)), neuron]
    gap = np.minimum(np.abs(pre + 0.3), np.abs(pre - 0.4))
    assert gap.max() < 1e-12, gap.max()


def test_prelu_per_channel_and_functional_ops() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(7)
            self.a = nn.Linear(2, 6)
            self.p = nn.PReLU(6, init=0.3)
            self.b = nn.Linear(6, 6)
            self.c = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.p(self.a(x))
            h = nn.functional.hardtanh(self.b(h) * 2.0, -0.5, 0.5)
            return self.c(h.relu() - 0.1)

    model = Net().eval()
    with torch.no_grad():
        model.p.weight.copy_(torch.linspace(-0.5, 0.5, 6))
    part = partition(model, BOX, device="cpu")
    _check(part, model)


def test_cnn_with_batchnorm_maxpool_on_image_plane() -> None:
    model = SmallCNN().eval()
    sl = digits_slice()
    part = partition(model, sl, device="cpu")
    assert part.n_regions > 50
    kinds = [layer["kind"] for layer in part.model_summary["layers"]]
    assert kinds == ["relu", "maxpool", "abs"]
    _check(part, model)


@pytest.mark.parametrize("children", CHILDREN)
def test_cnn_with_every_unit_kind(children: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # per-channel PReLU and hard-tanh on feature maps, max-pool, convolution stages and a
    # matrix stage (flatten -> linear); children's inputs computed both ways
    _children(monkeypatch, children)
    model = ConvKinds().eval()
    part = partition(model, digits_slice(seed=1), device="cpu")
    kinds = [layer["kind"] for layer in part.model_summary["layers"]]
    assert kinds == ["relu", "prelu", "maxpool", "hardtanh", "leaky"]
    assert part.n_regions > 50
    _check(part, model)


def test_torch_export_program() -> None:
    model = mlp((10, 10), 3, seed=8)
    ep = torch.export.export(model, (torch.zeros(1, 2),))
    a = partition(ep, BOX, device="cpu")
    b = partition(model, BOX, device="cpu")
    assert a.n_regions == b.n_regions
    assert a.regions.column("area").equals(b.regions.column("area"))
    _check(a, model)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("widths", [(6,), (5, 5), (4, 4, 4), (8, 6)])
def test_region_count_matches_brute_force(widths: tuple[int, ...], seed: int) -> None:
    model = mlp(widths, 2, seed=seed)
    part = partition(model, BOX, device="cpu")
    ref = reference_regions(model, BOX)
    assert part.n_regions == len(ref)
    ours = sorted(bytes(s) for s in part.states)
    theirs = sorted(bytes(np.array(p, np.uint8)) for _, p in ref)
    assert ours == theirs
    np.testing.assert_allclose(
        np.sort(np.asarray(part.regions.column("area"))),
        np.sort([poly.area for poly, _ in ref]),
        rtol=1e-7,
        atol=1e-12,
    )


def _net_with(weights: list[tuple[list[list[float]], list[float]]]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (w, b) in enumerate(weights):
        lin = nn.Linear(len(w[0]), len(w))
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(w))
            lin.bias.copy_(torch.tensor(b))
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def test_degenerate_neurons() -> None:
    # rows: through the corner (1, 1); three lines through (0.25, 0.25); dead; duplicated;
    # duplicated up to scale; constant on the slice; on the domain's border; parallel pair
    w1 = [
        [1.0, 1.0],
        [1.0, -1.0],
        [1.0, 0.0],
        [0.0, 1.0],
        [0.0, 0.0],
        [1.0, 2.0],
        [1.0, 2.0],
        [2.0, 4.0],
        [0.0, 0.0],
        [1.0, 0.0],
        [0.5, -0.25],
        [0.5, -0.25],
    ]
    b1 = [-2.0, 0.0, -0.25, -0.25, -5.0, 0.1, 0.1, 0.2, 0.7, -1.0, 0.1, -0.2]
    rng = np.random.default_rng(0)
    w2 = rng.normal(size=(6, 12)).tolist()
    w2[0] = [0.0] * 12  # second-layer neuron constant (its bias only)
    b2 = [0.3, 0.1, -0.2, 0.0, 0.05, -0.1]
    w3 = rng.normal(size=(3, 6)).tolist()
    model = _net_with([(w1, b1), (w2, b2), (w3, [0.0, 0.1, -0.1])])
    part = partition(model, BOX, device="cpu")
    _check(part, model)
    ref = reference_regions(model, BOX)
    assert part.n_regions == len(ref)


def test_lines_through_one_point_and_vertex() -> None:
    angles = np.linspace(0, np.pi, 9)[:-1]
    w1 = np.stack([np.cos(angles), np.sin(angles)], 1).tolist()
    model = _net_with([(w1, [0.0] * 8), ([[1.0] * 8], [-0.5])])
    part = partition(model, BOX, device="cpu")
    assert part.n_regions == 16  # 8 lines through the centre: 16 sectors
    _check(part, model)
    cen = np.stack(
        [
            np.asarray(part.regions.column("centroid_u0")),
            np.asarray(part.regions.column("centroid_u1")),
        ],
        1,
    )
    assert np.all(np.linalg.norm(cen, axis=1) > 0.1)


def test_thin_regions_are_kept() -> None:
    w1 = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    b1 = [0.0, -1e-7, 0.0]
    model = _net_with([(w1, b1), ([[1.0, -1.0, 1.0]], [0.0])])
    part = partition(model, BOX, device="cpu")
    area = np.sort(np.asarray(part.regions.column("area")))
    assert part.n_regions == 6
    np.testing.assert_allclose(area[:2], 1e-7, rtol=1e-6)
    _check(part, model)


def test_edges_separate_regions_that_differ_in_their_neuron() -> None:
    model = mlp((10, 10), 3, seed=9)
    part = partition(model, BOX, device="cpu")
    e = part.edges.to_pydict()
    inner = [i for i, r in enumerate(e["region_right"]) if r is not None]
    assert inner, "no interior edges"
    offsets = [layer["unit_offset"] for layer in part.model_summary["layers"]]
    for i in inner:
        a, b = part.states[e["region_left"][i]], part.states[e["region_right"][i]]
        unit = offsets[e["layer"][i]] + e["neuron"][i]
        assert e["unit"][i] == unit
        assert a[unit] != b[unit]
    # every side of every region is covered once by edges: perimeters add up
    polys = part.polygons()
    perimeter = float(shapely.length(polys).sum())
    length = np.asarray(part.edges.column("length"))
    border = np.array([r is None for r in e["region_right"]])
    np.testing.assert_allclose(
        2 * length[~border].sum() + length[border].sum(), perimeter, rtol=1e-9
    )
    np.testing.assert_allclose(length[border].sum(), 8.0, rtol=1e-12)
    # shared segments lie on both regions' boundaries
    for i in inner[:50]:
        seg = shapely.LineString([(e["u0_a"][i], e["u1_a"][i]), (e["u0_b"][i], e["u1_b"][i])])
        for r in (e["region_left"][i], e["region_right"][i]):
            assert polys[r].boundary.distance(seg.interpolate(0.5, normalized=True)) < 1e-9


def test_single_output_threshold_and_level_sets() -> None:
    model = mlp((12, 12), 1, seed=10)
    out = model(torch.zeros(1, 2)).item()
    part = partition(model, BOX, device="cpu", threshold=out)
    assert part.boundary.num_rows > 0
    _check(part, model)
    levels = [out - 0.05, out, out + 0.05]
    lv = partition(model, BOX, device="cpu", levels=levels)
    got = set(np.asarray(lv.boundary.column("level")).tolist())
    assert got <= set(levels) and len(got) >= 2
    _check(lv, model)


def test_boundary_is_top_two_tie_only() -> None:
    model = mlp((16, 16), 5, seed=11)
    part = partition(model, BOX, device="cpu")
    assert part.boundary.num_rows > 5
    _check(part, model)
    # the boundary separates regions of different predicted labels: its length is positive
    # and each segment's classes differ
    ca = np.asarray(part.boundary.column("class_a"))
    cb = np.asarray(part.boundary.column("class_b"))
    assert np.all(ca < cb)


def test_same_input_same_tables_byte_for_byte() -> None:
    model = mlp((20, 20), 3, seed=12)
    a = partition(model, BOX, device="cpu")
    b = partition(model, BOX, device="cpu")
    for name in ("regions", "edges", "boundary"):
        assert getattr(a, name).equals(getattr(b, name))


def test_small_chunks_give_the_same_partition() -> None:
    model = mlp((12, 12, 12), 2, seed=13)
    a = partition(model, BOX, device="cpu")
    b = partition(model, BOX, device="cpu", chunk_elements=2000)
    assert a.n_regions == b.n_regions
    np.testing.assert_allclose(
        np.sort(np.asarray(a.regions.column("area"))),
        np.sort(np.asarray(b.regions.column("area"))),
        rtol=1e-9,
    )
    assert sorted(bytes(s) for s in a.states) == sorted(bytes(s) for s in b.states)


def test_verify_fails_on_a_corrupted_partition() -> None:
    model = mlp((8, 8), 2, seed=14)
    part = partition(model, BOX, device="cpu")
    part.states[3, 0] ^= 1  # a wrong activation pattern
    report = part.verify(model)
    assert not report.ok
    failed = {c.name for c in report.checks if not c.passed}
    assert "patterns at centroids" in failed


def test_brute_force_check_names_a_wrong_pattern() -> None:
    model = mlp((8, 8), 2, seed=14)
    part = partition(model, BOX, device="cpu")
    part.states[3, 0] ^= 1
    check = next(c for c in part.verify(model).checks if c.name == "brute-force count")
    assert not check.passed
    assert "1 reference patterns missing here" in check.detail


def test_nearly_concurrent_lines_keep_their_tiny_regions() -> None:
    """8 lines through one point up to float32 rounding meet in 28 distinct points.

    The exact arrangement has 1 + 8 + 28 = 37 faces, most of them within 1e-7 of the
    point; the engine resolves those farther apart than its tolerance, so it may merge a
    pair of meeting points (36) but never drops a region the reference sees.
    """
    ang = np.linspace(0, np.pi, 9)[:-1]
    w = np.c_[np.cos(ang), np.sin(ang)]
    first, last = nn.Linear(2, 8), nn.Linear(8, 4)
    with torch.no_grad():  # float32 parameters: the lines miss the point by ~1e-8
        first.weight.copy_(torch.tensor(w))
        first.bias.copy_(torch.tensor(-(w @ [0.3, 0.2])))
        last.weight.copy_(torch.tensor(np.random.default_rng(0).normal(size=(4, 8))))
    model = nn.Sequential(first, nn.ReLU(), last).double().eval()
    part = partition(model, BOX, device="cpu")
    assert 36 <= part.n_regions <= 37
    report = part.verify(model)
    assert report.ok, report
    ref = reference_regions(model, BOX)
    assert len(ref) < part.n_regions  # the reference cannot see the tiny ones
    assert {bytes(np.array(p, np.uint8)) for _, p in ref} <= {bytes(s) for s in part.states}


def test_affine_maps_match_forward_at_random_points() -> None:
    model = mlp((16, 16), 3, seed=15)
    part = partition(model, BOX, device="cpu")
    a, c = part.affine_maps()
    rng = np.random.default_rng(0)
    u = rng.uniform(-1, 1, (2000, 2))
    tree = shapely.STRtree(part.polygons())
    idx, reg = tree.query(shapely.points(u), predicate="within")
    pred = np.einsum("pkd,pd->pk", a[reg], u[idx]) + c[reg]
    with torch.no_grad():
        out = model.double()(torch.tensor(u[idx])).numpy()
    np.testing.assert_allclose(pred, out, atol=1e-12)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (nn.GELU(), "GELU"),
        (nn.Sigmoid(), "Sigmoid"),
        (nn.Softmax(dim=1), "Softmax"),
    ],
)
def test_nonlinear_layers_are_refused_by_name(module: nn.Module, message: str) -> None:
    model = nn.Sequential(nn.Linear(2, 4), module, nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=message):
        partition(model, BOX, device="cpu")


def test_batchnorm_in_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=r"training mode; call model.eval\(\)"):
        partition(model, BOX, device="cpu")


def test_product_of_activations_is_refused() -> None:
    class Square(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return h * h

    with pytest.raises(UnsupportedModelError, match="not affine"):
        partition(Square(), BOX, device="cpu")


def test_shape_mismatch_names_the_shapes() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ModelShapeError, match=r"shape \(2,\)"):
        partition(model, BOX, device="cpu")


def test_bad_arguments() -> None:
    model = mlp((4,), 1)
    with pytest.raises(GeomstoreError, match="'auto', 'cpu'"):
        partition(model, BOX, device="tpu")
    with pytest.raises(GeomstoreError, match="tol"):
        partition(model, BOX, device="cpu", tol=0.5)
    with pytest.raises(GeomstoreError, match=r"geomstore\.Slice"):
        partition(model, "box", device="cpu")  # type: ignore[arg-type]


def test_affine_model_has_one_region() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    part = partition(model, Slice.box((0, 0), (2, 1)), device="cpu")
    assert part.n_regions == 1
    _check(part, model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model = mlp((32, 32), 3, seed=16)
    a = partition(model, BOX, device="cpu")
    b = partition(model, BOX, device="cuda")
    assert a.n_regions == b.n_regions
    _check(b, model)


def test_conv1d_pools_dropout_identity() -> None:
    torch.manual_seed(17)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1),
        nn.Identity(),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Dropout(0.5),
        nn.Conv1d(3, 4, 3, padding=1),
        nn.AvgPool1d(2),
        nn.LeakyReLU(0.05),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    rng = np.random.default_rng(3)
    sl = Slice.through(*(rng.random((2, 8)) for _ in range(3)), margin=0.3)
    part = partition(model, sl, device="cpu")
    kinds = [layer["kind"] for layer in part.model_summary["layers"]]
    assert kinds == ["relu", "maxpool", "leaky"]
    assert part.n_regions > 10
    _check(part, model)


@pytest.mark.parametrize("levels", [None, "levels"], ids=["top-two", "level-sets"])
def test_boundary_screen_of_gpus_keeps_every_segment(
    levels: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the decision boundary is screened on the device first; run on the CPU the
    screen gives the segments of the unscreened NumPy pass exactly, including regions whose
    vertices lie on the boundary (a network whose output is a multiple of an input)."""
    from geomstore.engine import tables

    calls: list[bool] = []
    plain = tables.boundary_segments

    def screened(*args: object, **kwargs: object) -> dict[str, np.ndarray]:
        got = plain(*args, **kwargs, screen=True)  # type: ignore[arg-type]
        want = plain(*args, **kwargs, screen=False)  # type: ignore[arg-type]
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        calls.append(len(want["region"]) > 0)
        return got

    monkeypatch.setattr(partition_mod, "boundary_segments", screened)
    tie = nn.Sequential(nn.Linear(2, 2))  # y = (x0, x1): the top-two tie is the diagonal
    with torch.no_grad():
        tie[0].weight.copy_(torch.eye(2))
        tie[0].bias.zero_()
    for model in (mlp((16, 16), 5, seed=11), mlp((12, 12), 1, seed=10), tie):
        out = model(torch.zeros(1, 2))[0, 0].item()  # levels of output 0
        lv = [out - 0.05, out, out + 0.05] if levels else None
        partition(model, BOX, device="cpu", levels=lv)
    assert len(calls) == 3 and all(calls)
