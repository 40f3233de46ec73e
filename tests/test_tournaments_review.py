"""Review of the max-pool tournaments' hand-off to the host (forced on the CPU).

Every test here forces :func:`geomstore.engine.tournaments._finish_on_host` on the CPU
(``_tail_to_host`` patched to True) at various ``HOST_TAIL_PAIRS`` and demands the result
of the rounds that never hand off, bit for bit: the whole partition's tables, and at
each max layer :func:`~geomstore.engine.tournaments.split_max`'s own output (padding slots
included) and the cut log (ids, units and chord directions in their order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomstore import partition
from geomstore.engine import split, tournaments
from geomstore.engine.crossings import crossings
from geomstore.engine.nonlinear import Nonlinearity
from geomstore.engine.split import CutLog, Polys, _Grow, pad_polys
from tests.nets import ConvKinds, digits_slice
from tests.test_reach import IMG, Wrap, _plane
from tests.test_split import _PoolNet

HUGE = 1 << 30
TOL = 1e-9


# --------------------------------------------------------------------------- recorders


@dataclass
class _Handoff:
    pairs: int
    rows: int  # distinct polygons handed over
    before: int  # buf.count before
    after: int  # buf.count after
    cap_before: int
    cap_after: int
    width_before: int
    width_after: int
    device_splits_before: bool  # some device round split a polygon before the hand-off


@dataclass
class _Rec:
    outputs: list[tuple[Tensor, ...]] = field(default_factory=list)
    handoffs: list[_Handoff] = field(default_factory=list)


def _record(monkeypatch: pytest.MonkeyPatch, *, force: bool, tail: int = HUGE) -> _Rec:
    """Record split_max's outputs and cut logs; force the hand-off at ``tail`` pairs."""
    rec = _Rec()
    split_max = tournaments.split_max
    finish = tournaments._finish_on_host

    def max_spy(spec, cells, state0, cross, tol, cuts):  # type: ignore[no-untyped-def]
        first = cuts.count
        polys, states = split_max(spec, cells, state0, cross, tol, cuts)
        units = torch.cat(cuts.units)[first:] if cuts.count else torch.zeros(0)
        dirs = torch.cat(cuts.dirs)[first:] if cuts.count else torch.zeros(0)
        assert all(u.device == state0.device for u in cuts.units)
        assert all(d.device == state0.device for d in cuts.dirs)
        assert int(units.shape[0]) == cuts.count - first == int(dirs.shape[0])
        rec.outputs.append(
            (polys.verts, polys.n, polys.side, polys.parent, states, units, dirs, first)
        )
        return polys, states

    def finish_spy(spec, buf, cross, pairs, tol, cuts):  # type: ignore[no-untyped-def]
        pp = pairs[0]
        cells = int(buf.cell[: buf.count].max()) + 1
        before = buf.count
        cap0, w0 = int(buf.n.shape[0]), int(buf.verts.shape[1])
        finish(spec, buf, cross, pairs, tol, cuts)
        _check_buffer(buf)
        rec.handoffs.append(
            _Handoff(
                int(pp.shape[0]),
                int(torch.unique(pp).shape[0]),
                before,
                buf.count,
                cap0,
                int(buf.n.shape[0]),
                w0,
                int(buf.verts.shape[1]),
                before > cells,
            )
        )

    monkeypatch.setattr(tournaments, "split_max", max_spy)
    if force:
        monkeypatch.setattr(tournaments, "_tail_to_host", lambda device: True)
        monkeypatch.setattr(tournaments, "HOST_TAIL_PAIRS", tail)
        monkeypatch.setattr(tournaments, "_finish_on_host", finish_spy)
    return rec


def _check_buffer(buf: _Grow) -> None:
    """The growable buffer's invariants after a hand-off."""
    m = buf.count
    assert m <= buf.n.shape[0] == buf.verts.shape[0] == buf.side.shape[0]
    assert buf.cell.shape[0] == buf.states.shape[0] == buf.n.shape[0]
    # flat is still a view of states (writes through it reach the states)
    assert buf.flat.data_ptr() == buf.states.data_ptr()
    assert buf.flat.numel() == buf.states.numel()
    # every polygon has a spare slot (clip_both needs W > n)
    assert int(buf.n[:m].max()) < buf.verts.shape[1] == buf.side.shape[1]
    assert int(buf.n[:m].min()) >= 3


def _same_outputs(got: _Rec, ref: _Rec) -> None:
    assert len(got.outputs) == len(ref.outputs)
    for a, b in zip(got.outputs, ref.outputs, strict=True):
        *ta, fa = a
        *tb, fb = b
        assert fa == fb  # the first cut id of the layer
        for x, y in zip(ta, tb, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y)


def _run(net: nn.Module, sl: Any, monkeypatch: pytest.MonkeyPatch, tail: int) -> _Rec:
    """Partition with and without the forced hand-off: the same bits everywhere."""
    with monkeypatch.context() as mp:
        ref_rec = _record(mp, force=False)
        ref = partition(net, sl, device="cpu")
    assert ref_rec.outputs, "no max layer was split"
    with monkeypatch.context() as mp:
        rec = _record(mp, force=True, tail=tail)
        got = partition(net, sl, device="cpu")
    # a small tail may never be met (the last round holding more pairs, all settled)
    assert all(h.pairs <= tail for h in rec.handoffs) and (rec.handoffs or tail < HUGE)
    _same_outputs(rec, ref_rec)
    assert got.regions.equals(ref.regions)
    assert got.edges.equals(ref.edges)
    assert got.boundary.equals(ref.boundary)
    report = got.verify(net, grid=32)
    assert report.ok, str(report)
    return rec


# ----------------------------------------------------------- networks through partition


def _wrap(f: Callable[[Tensor], Tensor], shape: tuple[int, ...], width: int, conv: bool) -> Any:
    return Wrap(f, shape, width, conv=width if conv else 0, seed=1).eval()


def _maxout(pieces: int, groups: int) -> Callable[[Tensor], Tensor]:
    return lambda h: h.view(h.shape[0], groups, pieces).amax(-1)


class _MaxoutStack(nn.Module):
    """Linear -> maxout (8 pieces) -> linear -> maxout (5 pieces) -> max_pool1d -> head:
    several max layers in a row, long tournaments."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.a = nn.Linear(2, 24)
        self.b = nn.Linear(3, 20)
        self.head = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x).view(x.shape[0], 3, 8).amax(-1)
        h = self.b(h).view(x.shape[0], 4, 5).amax(-1)
        h = F.max_pool1d(h.unsqueeze(1), 2).flatten(1)
        return self.head(h)


class _DeadThenLive(nn.Module):
    """A max layer whose first candidate wins by far everywhere (no crossings), then a
    max-pool layer that crosses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.a = nn.Linear(2, 12)
        self.b = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 * 2 * 2, 2)
        with torch.no_grad():
            self.a.bias[::4] += 100.0

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x).view(x.shape[0], 3, 4).amax(-1)  # constant winner: candidate 0
        img = torch.cat([h, h, h[:, :1]], 1).view(x.shape[0], 1, 7, 1).expand(-1, -1, -1, 4)
        g = self.b(img[:, :, :4, :])
        return self.head(F.max_pool2d(g, 2, stride=2).flatten(1))


def _nets() -> dict[str, tuple[nn.Module, Any]]:
    torch.manual_seed(0)
    img = _plane(IMG, scale=4.0)
    return {
        "pool2": (_wrap(nn.MaxPool2d(2), IMG, 3, True), img),
        "pool3 s2 pad ceil": (
            _wrap(nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), IMG, 2, True),
            _plane(IMG, scale=2.0),
        ),
        "pool3 s1 overlapping": (_wrap(lambda h: F.max_pool2d(h, 3, 1), IMG, 2, True), img),
        "pool2 dilation": (_wrap(lambda h: F.max_pool2d(h, 2, 1, dilation=2), IMG, 2, True), img),
        "max_pool1d": (_wrap(lambda h: F.max_pool1d(h.flatten(2), 3), IMG, 2, True), img),
        "adaptive": (_wrap(lambda h: F.adaptive_max_pool2d(h, (2, 3)), IMG, 3, True), img),
        "maxout 8 pieces": (_wrap(_maxout(8, 2), (4,), 16, False), _plane((4,), scale=4.0)),
        "maxout 12 pieces": (_wrap(_maxout(12, 1), (3,), 12, False), _plane((3,), scale=6.0)),
        "pool twice": (
            _wrap(lambda h: F.max_pool2d(F.max_pool2d(h, 2, 1), 2, 1), IMG, 2, True),
            _plane(IMG, scale=2.0),
        ),
        "maxout stack": (_MaxoutStack().eval(), _plane((2,), scale=3.0)),
        "relu then pool2": (
            _wrap(lambda h: F.max_pool2d(h.relu(), 2), IMG, 3, True),
            _plane(IMG, scale=3.0),
        ),
        "pool net": (_PoolNet().eval(), digits_slice(0)),
        "kinds": (ConvKinds(2).eval(), digits_slice(2)),
    }


NETS = _nets()


SLOW = {"kinds"}  # a few seconds a run: two tails only
RUNS = [(n, t) for n in sorted(NETS) if n not in SLOW for t in (1, 2, 9, 40, 400, HUGE)]
RUNS += [(n, t) for n in sorted(SLOW) for t in (9, 150)]


@pytest.mark.parametrize(("name", "tail"), RUNS, ids=[f"{n}-{t}" for n, t in RUNS])
def test_forced_handoff_gives_the_same_bits(
    name: str, tail: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, sl = NETS[name]
    rec = _run(net, sl, monkeypatch, tail)
    if tail == HUGE:  # every layer goes over whole, before any device round
        assert not any(h.device_splits_before for h in rec.handoffs)


def test_handoff_corner_cases_are_all_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """Across a few nets, the forced hand-off meets: a tail with no split left (pieces
    come back as they went), one that splits, one after device splits, a host buffer
    wider than the device's (write-back widens the device buffer), and one pair left."""
    seen: list[_Handoff] = []
    for name in ("pool3 s1 overlapping", "maxout 12 pieces", "relu then pool2"):
        net, sl = NETS[name]
        for tail in (1, 9, 150, HUGE):
            seen += _run(net, sl, monkeypatch, tail).handoffs
    assert any(h.after == h.before for h in seen)  # nothing split on the host
    assert any(h.after > h.before for h in seen)  # pieces appended
    assert any(h.device_splits_before for h in seen)
    assert any(h.device_splits_before and h.after > h.before for h in seen)
    assert any(h.cap_after > h.cap_before for h in seen)
    assert any(h.width_after > h.width_before for h in seen)
    assert any(h.pairs == 1 for h in seen)


def test_no_crossings_layer_then_handoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """A max layer with no crossing pair never reaches split_max; the next one hands off."""
    net, sl = _DeadThenLive().eval(), _plane((2,), scale=3.0)
    layers: list[int] = []
    orig = tournaments.split_max

    def spy(spec, *args):  # type: ignore[no-untyped-def]
        layers.append(spec.layer)
        return orig(spec, *args)

    with monkeypatch.context() as mp:
        mp.setattr(tournaments, "split_max", spy)
        part = partition(net, sl, device="cpu")
    kinds = [la["kind"] for la in part.model_summary["layers"]]
    assert kinds.count("maxpool") == 2
    assert 0 not in layers and layers  # layer 0 (the dead maxout) had no crossings
    for tail in (1, HUGE):
        _run(net, sl, monkeypatch, tail)


# ------------------------------------------------- split_max on synthetic cells directly


def _spec(n_in: int, cand: Tensor, offset: int = 0) -> Nonlinearity:
    return Nonlinearity(
        layer=0,
        node=None,  # type: ignore[arg-type]
        name="max",
        kind="maxpool",
        in_shape=(n_in,),
        out_shape=(int(cand.shape[0]),),
        candidates=cand,
        unit_offset=offset,
    )


def _cells(seed: int, extra_width: int) -> Polys:
    """Regular-ish convex polygons (3 to 8 vertices) on a grid, padded wider than needed."""
    g = torch.Generator().manual_seed(seed)
    polys, ns = [], []
    for i in range(4):
        for j in range(4):
            k = int(torch.randint(3, 9, (1,), generator=g))
            ang = torch.arange(k, dtype=torch.float64) * (2 * torch.pi / k)
            ang = ang + float(torch.rand(1, generator=g, dtype=torch.float64))
            r = 0.45 + 0.05 * float(torch.rand(1, generator=g, dtype=torch.float64))
            v = torch.stack([i + r * ang.cos(), j + r * ang.sin()], 1)
            polys.append(v)
            ns.append(k)
    w = max(ns) + 1 + extra_width
    verts = torch.stack([torch.cat([v, v[:1].expand(w - len(v), 2)]) for v in polys])
    side = torch.full((len(polys), w), split.PAD_SIDE, dtype=torch.int64)
    for p, k in enumerate(ns):
        side[p, :k] = -1 - torch.arange(k)
        side[p, k:] = -1  # padding labels as a previous clip_both would leave them
    n = torch.tensor(ns)
    return Polys(verts, n, side, torch.arange(len(polys)))


def _windows(n_in: int, k: int, stride: int) -> Tensor:
    starts = torch.arange(0, n_in - k + 1, stride)
    return starts[:, None] + torch.arange(k)[None, :]


def _split_max(
    spec: Nonlinearity, cells: Polys, coef: Tensor, first: int
) -> tuple[Polys, Tensor, CutLog, Tensor]:
    state0, cross = crossings(spec, coef, cells.verts, cells.n, TOL)
    cuts = CutLog()
    if first:  # earlier layers' cuts
        cuts.add(torch.zeros(first, dtype=torch.long), torch.ones(first), torch.ones(first))
    polys, states = tournaments.split_max(spec, cells, state0, cross, TOL, cuts)
    return polys, states, cuts, state0


def _synthetic(seed: int, k: int, stride: int, scale: float) -> tuple[Nonlinearity, Polys, Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_in = 12
    cand = _windows(n_in, k, stride)
    cells = _cells(seed, extra_width=seed % 3)
    coef = (torch.rand((len(cells), 3, n_in), generator=g, dtype=torch.float64) - 0.5) * scale
    coef[:, 2] -= coef[:, 0] * cells.verts[:, :1, 0] + coef[:, 1] * cells.verts[:, :1, 1]
    return _spec(n_in, cand, offset=3), cells, coef


def _check_pieces(spec: Nonlinearity, cells: Polys, coef: Tensor, polys: Polys, st: Tensor) -> None:
    """Pieces tile their cells, and each piece's states are the first maxima inside it."""
    m = len(polys)
    idx = torch.arange(polys.verts.shape[1])
    valid = idx[None, :] < polys.n[:, None]
    v = torch.where(valid[..., None], polys.verts, 0.0)
    centre = v.sum(1) / polys.n[:, None]  # interior (convex, n >= 3)
    nxt = polys.verts.roll(-1, 1)
    # shoelace over the real sides: the slot n - 1 wraps to 0 (padding repeats vertex 0)
    cross_ = polys.verts[..., 0] * nxt[..., 1] - polys.verts[..., 1] * nxt[..., 0]
    area = 0.5 * torch.where(idx[None, :] < polys.n[:, None], cross_, 0.0).sum(1)
    assert bool((area > 0).all())
    cv = cells.verts
    cn = cv.roll(-1, 1)
    cidx = torch.arange(cv.shape[1])
    ccross = cv[..., 0] * cn[..., 1] - cv[..., 1] * cn[..., 0]
    carea = 0.5 * torch.where(cidx[None, :] < cells.n[:, None], ccross, 0.0).sum(1)
    got = torch.zeros(len(cells), dtype=torch.float64).index_add_(0, polys.parent, area)
    torch.testing.assert_close(got, carea, rtol=0, atol=1e-12)
    c = coef[polys.parent]  # (m, 3, n_in)
    vals = c[:, 0] * centre[:, :1] + c[:, 1] * centre[:, 1:] + c[:, 2]
    cand = spec.candidates
    assert cand is not None
    f = vals[:, cand]  # (m, U, k)
    assert torch.equal(st.long(), f.argmax(-1)), "a piece's winner is not the maximum"
    assert m >= len(cells)


SYNTH = [
    # (seed, window, stride, scale)
    (0, 2, 2, 1.0),
    (1, 3, 1, 2.0),
    (2, 4, 2, 1.5),
    (3, 12, 1, 1.0),  # one maxout unit with 12 pieces
    (4, 6, 3, 3.0),
    (5, 1, 1, 1.0),  # windows of one candidate: no tests (no crossings)
]


@pytest.mark.parametrize("tail", [1, 2, 5, 37, HUGE])
@pytest.mark.parametrize("case", SYNTH, ids=[f"k{c[1]}s{c[2]}" for c in SYNTH])
def test_split_max_handoff_on_synthetic_cells(
    case: tuple[int, int, int, float], tail: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed, k, stride, scale = case
    spec, cells, coef = _synthetic(seed, k, stride, scale)
    _, cross = crossings(spec, coef, cells.verts, cells.n, TOL)
    if k == 1:
        assert len(cross) == 0
        return
    assert len(cross) > 0
    ref = _split_max(spec, cells, coef, first=seed)
    calls: list[int] = []
    finish = tournaments._finish_on_host

    def spy(spec_, buf, cross_, pairs, *rest):  # type: ignore[no-untyped-def]
        calls.append(int(pairs[0].shape[0]))
        finish(spec_, buf, cross_, pairs, *rest)
        _check_buffer(buf)

    with monkeypatch.context() as mp:
        mp.setattr(tournaments, "_tail_to_host", lambda device: True)
        mp.setattr(tournaments, "HOST_TAIL_PAIRS", tail)
        mp.setattr(tournaments, "_finish_on_host", spy)
        got = _split_max(spec, cells, coef, first=seed)
    assert all(c <= tail for c in calls) and (calls or tail < HUGE)
    _same_split(got, ref)
    _check_pieces(spec, cells, coef, got[0], got[1])


def _same_split(got: Any, ref: Any) -> None:
    (gp, gs, gc, _), (rp, rs, rc, _) = got, ref
    for a, b in (
        (gp.verts, rp.verts),
        (gp.n, rp.n),
        (gp.side, rp.side),
        (gp.parent, rp.parent),
        (gs, rs),
        (torch.cat(gc.units), torch.cat(rc.units)),
        (torch.cat(gc.dirs), torch.cat(rc.dirs)),
    ):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert gc.count == rc.count
    # the cut ids on the sides are the log's positions, from the first id on
    ids = gp.side[gp.side >= 0]
    assert ids.numel() and int(ids.min()) >= 0 and int(ids.max()) < gc.count


class _Tight(_Grow):
    """A _Grow whose buffers hold exactly its polygons: every split and every hand-off's
    write-back has to grow them (and re-point ``flat``)."""

    def __init__(self, cells: Polys, state0: Tensor, cross: Any) -> None:
        super().__init__(cells, state0, cross)
        m = self.count
        for name in ("verts", "side", "n", "cell", "states"):
            setattr(self, name, getattr(self, name)[:m].clone())
        self.flat = self.states.view(-1)


@pytest.mark.parametrize("tail", [1, 3, 40, HUGE])
@pytest.mark.parametrize("seed", [1, 3, 4])
def test_handoff_when_buffers_must_grow(
    seed: int, tail: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Device and host buffers with no spare rows: the write-back's reserve grows the
    device buffer, and ``flat`` still writes into ``states``."""
    case = next(c for c in SYNTH if c[0] == seed)
    spec, cells, coef = _synthetic(*case)
    ref = _split_max(spec, cells, coef, first=0)
    grew: list[bool] = []
    finish = tournaments._finish_on_host

    def spy(spec_, buf, cross_, pairs, *rest):  # type: ignore[no-untyped-def]
        cap = int(buf.n.shape[0])
        finish(spec_, buf, cross_, pairs, *rest)
        _check_buffer(buf)
        grew.append(int(buf.n.shape[0]) > cap)

    with monkeypatch.context() as mp:
        mp.setattr(tournaments, "_Grow", _Tight)
        tight = _split_max(spec, cells, coef, first=0)
        mp.setattr(tournaments, "_tail_to_host", lambda device: True)
        mp.setattr(tournaments, "HOST_TAIL_PAIRS", tail)
        mp.setattr(tournaments, "_finish_on_host", spy)
        got = _split_max(spec, cells, coef, first=0)
    _same_split(tight, ref)
    _same_split(got, ref)
    assert grew or tail < HUGE
    if tail == HUGE:
        assert any(grew)


@pytest.mark.parametrize("tail", [2, 40, HUGE])
@pytest.mark.parametrize("seed", [0, 2])
def test_handoff_with_a_narrower_host_buffer(
    seed: int, tail: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cells padded wider than they need: a host buffer that starts narrower than the
    device's still gives the same polygons (up to the padding's side labels)."""
    case = next(c for c in SYNTH if c[0] == seed)
    spec, cells, coef = _synthetic(*case)
    cells = Polys(
        *pad_polys(cells.verts, cells.side, cells.verts.shape[1] + 4)[:1],
        cells.n,
        pad_polys(cells.verts, cells.side, cells.verts.shape[1] + 4)[1],
        cells.parent,
    )
    ref = _split_max(spec, cells, coef, first=0)
    on_host: list[bool] = []  # inside a hand-off
    narrowed: list[int] = []
    finish = tournaments._finish_on_host

    class _HostNarrow(_Grow):
        def __init__(self, c: Polys, s: Tensor, x: Any) -> None:
            if on_host:
                w = int(c.n.max()) + 1
                narrowed.append(int(c.verts.shape[1]) - w)
                c = Polys(c.verts[:, :w], c.n, c.side[:, :w], c.parent)
            super().__init__(c, s, x)

    def spy(*args):  # type: ignore[no-untyped-def]
        on_host.append(True)
        try:
            finish(*args)
        finally:
            on_host.pop()
        _check_buffer(args[1])

    with monkeypatch.context() as mp:
        mp.setattr(tournaments, "_Grow", _HostNarrow)
        mp.setattr(tournaments, "_tail_to_host", lambda device: True)
        mp.setattr(tournaments, "HOST_TAIL_PAIRS", tail)
        mp.setattr(tournaments, "_finish_on_host", spy)
        got = _split_max(spec, cells, coef, first=0)
    assert (narrowed and max(narrowed) > 0) or tail < HUGE  # the host buffer starts narrower
    (gp, gs, gc, _), (rp, rs, rc, _) = got, ref
    assert gp.verts.shape == rp.verts.shape and torch.equal(gp.verts, rp.verts)
    assert torch.equal(gp.n, rp.n) and torch.equal(gp.parent, rp.parent) and torch.equal(gs, rs)
    real = torch.arange(gp.side.shape[1])[None, :] < gp.n[:, None]
    assert torch.equal(gp.side[real], rp.side[real])
    assert torch.equal(torch.cat(gc.units), torch.cat(rc.units))
    assert torch.equal(torch.cat(gc.dirs), torch.cat(rc.dirs))
