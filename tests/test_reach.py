"""Engine reach: one small model per row of the operator table, partitioned and verified.

Every piecewise-linear and affine row gets a model that uses it (as a module, a
functional call or a tensor method), a partition of a plane through three random inputs,
and the exactness checks of ``verify``, including the model's output against the
region's affine map at random interior points of every region. Every refused kind gets a
model and the refusal's message.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import shapely
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomstore import Slice, UnsupportedModelError, partition
from geomstore.engine.ops import TABLE, markdown_table


class Wrap(nn.Module):
    """in -> Linear/Conv -> f(h) -> Linear head; ``f`` is the operator under test."""

    def __init__(
        self,
        f: Callable[[Tensor], Tensor],
        shape: tuple[int, ...],
        width: int,
        *,
        conv: int = 0,
        seed: int = 0,
        out: int = 3,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.f = f
        self.shape = shape
        self.pre = nn.Conv2d(shape[0], conv, 3, padding=1) if conv else nn.Linear(shape[0], width)
        with torch.no_grad():
            probe = self.f(self.pre(torch.zeros(1, *shape)))
        self.head = nn.Linear(probe[0].numel(), out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.f(self.pre(x)).flatten(1))


def _plane(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> Slice:
    g = torch.Generator().manual_seed(seed)
    a, b, c = ((torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * scale for _ in "abc")
    return Slice.through(a.numpy(), b.numpy(), c.numpy(), margin=0.3, domain="triangle")


def _check(model: nn.Module, sl: Slice, kinds: set[str], **kw: object) -> None:
    part = partition(model.eval(), sl, device="cpu", **kw)  # type: ignore[arg-type]
    report = part.verify(model, grid=48)
    assert report.ok, str(report)
    assert part.n_regions > 1
    got = {layer["kind"] for layer in part.model_summary["layers"]}
    assert kinds <= got, (kinds, got)


VEC = (4,)
IMG = (2, 6, 6)

# name -> (operator, input shape, width or channels, conv?, engine kinds it must create)
PIECEWISE: dict[str, tuple[Callable[[Tensor], Tensor], tuple[int, ...], int, bool, set[str]]] = {
    "relu (method)": (lambda h: h.relu(), VEC, 8, False, {"relu"}),
    "relu_ (in place)": (lambda h: torch.relu_(h.clone()), VEC, 8, False, {"relu"}),
    "leaky_relu": (lambda h: F.leaky_relu(h, 0.2), VEC, 8, False, {"leaky"}),
    "prelu (module)": (nn.PReLU(8, 0.3), VEC, 8, False, {"prelu"}),
    "prelu per channel": (nn.PReLU(4, -0.4), IMG, 4, True, {"prelu"}),
    "abs": (torch.abs, VEC, 8, False, {"abs"}),
    "hardtanh": (nn.Hardtanh(-0.3, 0.2), VEC, 8, False, {"hardtanh"}),
    "relu6": (lambda h: F.relu6(4 * h), VEC, 8, False, {"hardtanh"}),
    "clamp both": (lambda h: h.clamp(-0.3, 0.25), VEC, 8, False, {"hardtanh"}),
    "clip": (lambda h: torch.clip(h, -0.2, 0.3), VEC, 8, False, {"hardtanh"}),
    "clamp(min=0)": (lambda h: h.clamp(min=0), VEC, 8, False, {"relu"}),
    "clamp_min": (lambda h: torch.clamp_min(h, 0.1), VEC, 8, False, {"relu"}),
    "clamp(max=)": (lambda h: h.clamp(max=-0.1), VEC, 8, False, {"relu"}),
    "clamp tensor bounds": (
        lambda h: torch.clamp(h, min=torch.full((8,), -0.2), max=torch.linspace(0.0, 0.5, 8)),
        VEC,
        8,
        False,
        {"relu"},
    ),
    "threshold(t, t)": (lambda h: F.threshold(h, 0.1, 0.1), VEC, 8, False, {"relu"}),
    "maximum": (lambda h: torch.maximum(h[:, :4], h[:, 4:]), VEC, 8, False, {"relu"}),
    "minimum": (lambda h: torch.minimum(h[:, :4], h[:, 4:]), VEC, 8, False, {"relu"}),
    "maximum with a constant": (
        lambda h: torch.maximum(h, torch.linspace(-0.3, 0.3, 8)),
        VEC,
        8,
        False,
        {"relu"},
    ),
    "maxout amax": (lambda h: h.view(h.shape[0], 3, 4).amax(-1), VEC, 12, False, {"maxpool"}),
    "maxout view(n, -1, k)": (
        lambda h: h.view(h.shape[0], -1, 4).amax(-1),
        VEC,
        12,
        False,
        {"maxpool"},
    ),
    "maxout max.values": (
        lambda h: h.view(h.shape[0], 3, 4).max(-1).values,
        VEC,
        12,
        False,
        {"maxpool"},
    ),
    "min over dim": (lambda h: h.view(h.shape[0], 3, 4).min(-1)[0], VEC, 12, False, {"maxpool"}),
    "amin keepdim": (
        lambda h: h.view(h.shape[0], 4, 3).amin(1, keepdim=True),
        VEC,
        12,
        False,
        {"maxpool"},
    ),
    "max_pool2d": (nn.MaxPool2d(2), IMG, 3, True, {"maxpool"}),
    "max_pool2d ceil, pad, stride": (
        nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
        IMG,
        3,
        True,
        {"maxpool"},
    ),
    "max_pool2d dilation": (lambda h: F.max_pool2d(h, 2, 1, dilation=2), IMG, 2, True, {"maxpool"}),
    "max_pool1d": (lambda h: F.max_pool1d(h.flatten(2), 3), IMG, 2, True, {"maxpool"}),
    "max_pool3d": (lambda h: F.max_pool3d(h.unsqueeze(1), 2), IMG, 2, True, {"maxpool"}),
    "adaptive max pool": (nn.AdaptiveMaxPool2d((2, 3)), IMG, 3, True, {"maxpool"}),
    "adaptive max pool 1d": (
        lambda h: F.adaptive_max_pool1d(h.flatten(2), 5),
        IMG,
        2,
        True,
        {"maxpool"},
    ),
}

AFFINE: dict[str, tuple[Callable[[Tensor], Tensor], tuple[int, ...], int, bool]] = {
    "adaptive avg pool (1)": (nn.AdaptiveAvgPool2d(1), IMG, 4, True),
    "adaptive avg pool (2, 3)": (lambda h: F.adaptive_avg_pool2d(h, (2, 3)), IMG, 3, True),
    "global mean by hand": (lambda h: h.mean((2, 3)), IMG, 4, True),
    "sum over dims": (lambda h: h.sum(-1), IMG, 3, True),
    "avg pool": (nn.AvgPool2d(2), IMG, 3, True),
    "zero pad": (nn.ZeroPad2d((1, 0, 2, 1)), IMG, 2, True),
    "F.pad constant": (lambda h: F.pad(h, (1, 1, 0, 2), value=0.3), IMG, 2, True),
    "reflection pad": (nn.ReflectionPad2d(1), IMG, 2, True),
    "conv transpose": (nn.ConvTranspose2d(2, 2, 3, stride=2), IMG, 2, True),
    "upsample nearest": (nn.Upsample(scale_factor=2, mode="nearest"), IMG, 2, True),
    "upsample bilinear": (
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        IMG,
        2,
        True,
    ),
    "interpolate size": (lambda h: F.interpolate(h, size=(7, 5)), IMG, 2, True),
    "conv dilation groups": (nn.Conv2d(4, 4, 3, dilation=2, groups=2), IMG, 4, True),
    "conv1d": (
        lambda h: F.conv1d(h.flatten(2), torch.ones(2, 2, 3, dtype=h.dtype) / 3),
        IMG,
        2,
        True,
    ),
    "permute, flip, slicing": (lambda h: h.permute(0, 2, 3, 1).flip(1)[:, 1:, ::2], IMG, 2, True),
    "stack and cat": (lambda h: torch.cat([torch.stack([h, -h], 1), h[:, None]], 1), VEC, 6, False),
    "constant indices": (lambda h: h[:, [0, 3, 5, 5]], VEC, 6, False),
    "scale, shift, divide": (lambda h: (1.0 - 2 * h) / 3.0 + torch.arange(6.0), VEC, 6, False),
    "where with constant mask": (
        lambda h: torch.where(torch.arange(6) % 2 == 0, h, -h),
        VEC,
        6,
        False,
    ),
    "roll and repeat": (lambda h: h.roll(2, 1).repeat(1, 2), VEC, 5, False),
    "batch norm eval": (nn.BatchNorm2d(3).eval(), IMG, 3, True),
    "dropout eval": (nn.Dropout(0.4).eval(), VEC, 6, False),
}


@pytest.mark.parametrize("name", sorted(PIECEWISE))
def test_piecewise_operator_is_partitioned_exactly(name: str) -> None:
    f, shape, width, conv, kinds = PIECEWISE[name]
    model = Wrap(f, shape, width, conv=width if conv else 0, seed=1)
    # a ReLU after the operator under test too, so that its output is cut again
    _check(model, _plane(shape, scale=4.0), kinds)


@pytest.mark.parametrize("name", sorted(AFFINE))
def test_affine_operator_is_partitioned_exactly(name: str) -> None:
    f, shape, width, conv = AFFINE[name]
    g = nn.Sequential(nn.ReLU(), f) if isinstance(f, nn.Module) else lambda h: f(torch.relu(h))
    model = Wrap(g, shape, width, conv=width if conv else 0, seed=2)
    _check(model, _plane(shape, scale=4.0), {"relu"})


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + x)


class TinyResNet(nn.Module):
    """A ResNet in miniature: stem, two residual blocks, adaptive average pooling head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(3), BasicBlock(3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 4)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def test_residual_network_with_adaptive_head() -> None:
    _check(TinyResNet(), _plane((1, 5, 5), seed=4, scale=6.0), {"relu"})


class InplaceBlock(BasicBlock):
    """torchvision's BasicBlock as written there: an inplace ReLU and ``out += identity``."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        out += x
        return self.relu(out)


def test_torchvision_style_inplace_residuals_equal_their_out_of_place_form() -> None:
    plain = TinyResNet().eval()
    inplace = TinyResNet().eval()
    inplace.blocks = nn.Sequential(InplaceBlock(3), InplaceBlock(3))
    inplace.load_state_dict(plain.state_dict())
    sl = _plane((1, 5, 5), seed=4, scale=6.0)
    _check(inplace, sl, {"relu"})
    a, b = partition(plain, sl, device="cpu"), partition(inplace, sl, device="cpu")
    assert a.n_regions == b.n_regions
    assert (
        np.sort(a.pattern_hashes().view("V16").ravel())
        == np.sort(b.pattern_hashes().view("V16").ravel())
    ).all()


INPLACE = {
    "y.add_(h)": lambda y, h: torch.relu(y.add_(h)),
    "y.sub_(h).mul_(2).div_(3)": lambda y, h: torch.relu(y.sub_(h).mul_(2.0).div_(3.0)),
    "ReLU6(inplace)": lambda y, h: nn.ReLU6(inplace=True)(y),
    "Hardtanh(inplace)": lambda y, h: nn.Hardtanh(-0.5, 0.5, inplace=True)(y),
    "LeakyReLU(inplace)": lambda y, h: nn.LeakyReLU(0.1, inplace=True)(y),
    "threshold(inplace)": lambda y, h: F.threshold(y, 0.0, 0.0, inplace=True),
    "clamp_ / clamp_min_": lambda y, h: y.clamp_(-1.0, 1.0).clamp_min_(-0.5),
    "abs_": lambda y, h: y.abs_(),
}


class _TwoInputs(nn.Module):
    def __init__(self, f: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.o = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.f = f

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        return self.o(self.f(self.b(h), h))


@pytest.mark.parametrize("name", sorted(INPLACE))
def test_inplace_operators_are_their_out_of_place_forms(name: str) -> None:
    model = _TwoInputs(INPLACE[name]).eval()
    part = partition(model, _plane(VEC, scale=4.0), device="cpu")
    assert part.n_regions > 1 and part.verify(model, grid=32).ok


def test_export_program_with_maxout_and_clamp() -> None:
    model = Wrap(lambda h: h.view(h.shape[0], 2, 3).amax(-1).clamp(min=0), VEC, 6, seed=5)
    ep = torch.export.export(model.eval(), (torch.zeros(1, 4),))
    sl = _plane(VEC, scale=4.0)
    part = partition(ep, sl, device="cpu")
    assert part.verify(grid=32).ok
    # the program given runs itself, one input at a time (it was exported for batch 1)
    own = next(c for c in part.verify(ep, grid=32).checks if c.name == "model's own output")
    assert own.passed, own.detail
    direct = partition(model, sl, device="cpu")
    assert part.n_regions == direct.n_regions


def test_trailing_softmax_needs_logits() -> None:
    base = Wrap(torch.relu, VEC, 6, seed=6)
    model = nn.Sequential(base, nn.Softmax(dim=1)).eval()
    sl = _plane(VEC, scale=4.0)
    with pytest.raises(UnsupportedModelError, match="logits=True"):
        partition(model, sl, device="cpu")
    part = partition(model, sl, device="cpu", logits=True)
    ref = partition(base, sl, device="cpu")
    assert part.n_regions == ref.n_regions
    a, c = part.affine_maps()
    a0, c0 = ref.affine_maps()
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(c, c0)
    assert part.settings["logits"] is True


class Refused(nn.Module):
    def __init__(self, f: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 8)
        self.act = f
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.inp(x)))


REFUSED: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "GELU": (nn.GELU(), "aten.gelu"),
    "SiLU": (nn.SiLU(), "aten.silu"),
    "sigmoid": (torch.sigmoid, "aten.sigmoid"),
    "tanh": (nn.Tanh(), "aten.tanh"),
    "LayerNorm": (nn.LayerNorm(8), "aten.native_layer_norm"),
    "GroupNorm": (lambda h: F.group_norm(h, 2), "aten.native_group_norm"),
    "softmax inside": (lambda h: torch.softmax(h, 1), "aten._softmax"),
    "product of two activations": (lambda h: h * torch.relu(h), "aten.mul"),
    "attention": (
        lambda h: F.scaled_dot_product_attention(
            h.view(-1, 1, 2, 4), h.view(-1, 1, 2, 4), h.view(-1, 1, 2, 4)
        ).flatten(1),
        "attention",
    ),
    "indices of a max": (lambda h: h.max(-1, keepdim=True).indices * h, "indices"),
    "data-dependent division": (lambda h: h / (1.0 + h.abs()), "aten.div"),
    "cast to float32": (lambda h: h.float().double(), "float32"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_operator_is_named_before_any_computation(name: str) -> None:
    f, needle = REFUSED[name]
    with pytest.raises(UnsupportedModelError) as info:
        partition(Refused(f).eval(), Slice.through(*np.eye(4)[:3], margin=0.1), device="cpu")
    msg = str(info.value)
    assert needle in msg
    assert "not affine or piecewise linear" in msg
    assert "\n" not in msg


def test_refusal_names_module_path_and_source_line() -> None:
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return torch.tanh(self.fc(x))  # the line the error points at

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), Inner())).eval()
    with pytest.raises(UnsupportedModelError) as info:
        partition(model, Slice.through(*np.eye(4)[:3]), device="cpu")
    msg = str(info.value)
    assert "module '1.1' (Inner)" in msg
    assert "test_reach.py" in msg and "torch.tanh(self.fc(x))" in msg


def _swish(h: Tensor) -> Tensor:
    return h * torch.sigmoid(h)  # a helper's line, named by the error


def test_refusal_names_the_operators_own_line_inside_helpers() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.o = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.o(_swish(self.a(x)))

    with pytest.raises(UnsupportedModelError) as info:
        partition(Net().eval(), Slice.through(*np.eye(4)[:3]), device="cpu")
    msg = str(info.value)
    assert "aten.sigmoid" in msg and "module '<model>' (Net)" in msg
    assert "torch.sigmoid(h)  # a helper's line, named by the error" in msg


def test_batch_norm_in_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match="eval"):
        partition(model.train(), Slice.through(*np.eye(4)[:3]), device="cpu")


def test_fixed_batch_view_is_explained() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.fc(x))
            return torch.cat([h, torch.ones(1, 2)], 1)  # batch of one baked in

    with pytest.raises(UnsupportedModelError, match="batch"):
        partition(Fixed().eval(), Slice.through(*np.eye(4)[:3]), device="cpu")


def test_every_table_row_is_documented() -> None:
    doc = (__import__("pathlib").Path(__file__).parents[1] / "docs" / "operators.md").read_text()
    assert markdown_table() in doc, "regenerate docs/operators.md (python -m geomstore.engine.ops)"
    assert len(TABLE) > 150


def test_slice_takes_a_shapely_polygon_or_any_sequence() -> None:
    tri = shapely.Polygon([(0, 0), (2, 0), (0, 1)])
    a = Slice(np.zeros(2), np.eye(2), tri)
    b = Slice(np.zeros(2), np.eye(2), [(0.0, 0.0), (2.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
    c = Slice(np.zeros(2), np.eye(2), ((0, 0), (2, 0), (0, 1)))
    assert a == b == c
    assert a.area == pytest.approx(1.0)


@pytest.mark.parametrize(
    "case",
    [
        dict(x=(40, 16, 32, 32), w=(16, 16, 3, 3), stride=[1, 1], padding=[1, 1], groups=1),
        dict(x=(30, 8, 17, 15), w=(12, 8, 5, 3), stride=[2, 1], padding=[2, 0], groups=1),
        dict(x=(25, 12, 16, 16), w=(12, 3, 3, 3), stride=[2, 2], padding=[1, 1], groups=4),
        dict(x=(20, 6, 300), w=(4, 6, 7), stride=[3], padding=[0], groups=1),
        dict(x=(24, 8, 9, 9), w=(8, 4, 4, 4), stride=[2, 2], padding=[1, 1], groups=1, t=True),
        # few output positions per sample: one matrix product over the samples
        dict(x=(50, 32, 4, 4), w=(48, 32, 3, 3), stride=[1, 1], padding=[1, 1], groups=1),
        dict(x=(50, 24, 7, 6), w=(40, 24, 3, 2), stride=[2, 2], padding=[1, 0], groups=1),
        dict(x=(30, 16, 6, 6), w=(8, 16, 2, 2), stride=[1, 1], padding=[0, 0], groups=1, d=2),
    ],
)
def test_cpu_convolution_in_pieces_equals_whole_batch(
    case: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Convolutions run in cache-sized pieces of their batch give the whole batch's values
    (bit for bit; up to rounding where a piece is one matrix product)."""
    import geomstore.engine.graph as graph

    monkeypatch.setattr(graph, "CONV_PIECE_BYTES", 1 << 16)  # several pieces per batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case["x"], generator=g, dtype=torch.float64)
    w = torch.randn(case["w"], generator=g, dtype=torch.float64)
    transposed = case.get("t", False)
    bias = torch.randn(w.shape[1] if transposed else w.shape[0], dtype=torch.float64, generator=g)
    dims = len(case["stride"])
    out_pad = [1] * dims if transposed else [0] * dims
    dilation = [case.get("d", 1)] * dims
    args = (x, w, bias, case["stride"], case["padding"], dilation, transposed, out_pad)
    args = (*args, case["groups"])
    op = torch.ops.aten.convolution.default
    whole = op(*args)
    pieces = graph._convolution(op, args)
    per = 8 * w[0].numel() * x[0, 0].numel()
    assert x.shape[0] > graph.CONV_PIECE_BYTES // per  # the batch was cut
    assert pieces.shape == whole.shape and pieces.is_contiguous()
    if whole[0, 0].numel() > graph.GEMM_POSITIONS:
        assert torch.equal(pieces, whole)  # samples are computed alone either way
    else:
        torch.testing.assert_close(pieces, whole, rtol=1e-12, atol=1e-12)


def _branch_on_sum(h: Tensor) -> Tensor:
    if h.sum() > 0:  # the line the error must name
        return torch.relu(h)
    return -h


@pytest.mark.parametrize(
    "f",
    [
        _branch_on_sum,
        lambda h: torch.relu(h - h[:, 0].mean().item()),
        lambda h: torch.relu(h) if bool((h > 0).any()) else h,
    ],
    ids=["if h.sum() > 0", ".item()", ".any()"],
)
def test_data_dependent_control_flow_is_named_at_the_users_line(
    f: Callable[[Tensor], Tensor],
) -> None:
    with pytest.raises(UnsupportedModelError) as err:
        partition(Wrap(f, VEC, 6, seed=1).eval(), _plane(VEC), device="cpu")
    msg = str(err.value)
    assert "data-dependent control flow" in msg and "\n" not in msg
    assert f"{__file__}:" in msg and "make_fx" not in msg and "tracing_mode" not in msg
    if f is _branch_on_sum:
        assert "if h.sum() > 0:  # the line the error must name" in msg


def test_writing_into_the_input_in_place_is_refused_with_the_fix() -> None:
    class Scales(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            x.mul_(2.0)
            return torch.relu(self.fc(x))

    with pytest.raises(UnsupportedModelError, match=r"writes in place into its input.*x \* 2"):
        partition(Scales().eval(), _plane(VEC), device="cpu")
