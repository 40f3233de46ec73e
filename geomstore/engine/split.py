"""Vectorised splitting of convex polygons by lines, and the per-nonlinearity rounds.

Polygons live in padded tensors: ``verts`` (P, V, 2) counter-clockwise, ``n`` (P,) vertex
counts, and ``side`` (P, V) int64 labels of the side that starts at each vertex: a cut id
(>= 0, see :class:`CutLog`) or ``-(1 + k)`` for side ``k`` of the slice domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from geomstore.engine.crossings import Crossings, crossings
from geomstore.engine.graph import Nonlinearity
from geomstore.engine.kernels import bincount

__all__ = ["Crossings", "CutLog", "Polys", "clip_both", "crossings", "split_layer"]


@dataclass
class Polys:
    """A batch of convex polygons with the index of their parent cell and layer states."""

    verts: Tensor
    n: Tensor
    side: Tensor
    parent: Tensor

    def __len__(self) -> int:
        return int(self.n.shape[0])

    def take(self, idx: Tensor) -> Polys:
        width = int(self.n[idx].max().item()) if idx.numel() else 3
        return Polys(self.verts[idx, :width], self.n[idx], self.side[idx, :width], self.parent[idx])


@dataclass
class CutLog:
    """Every line cut made: its unit (global index) and the direction of its chord."""

    units: list[Tensor] = field(default_factory=list)
    dirs: list[Tensor] = field(default_factory=list)
    count: int = 0

    def add(self, units: Tensor, a0: Tensor, a1: Tensor) -> Tensor:
        k = int(units.shape[0])
        ids = torch.arange(self.count, self.count + k, device=units.device)
        norm = torch.sqrt(a0 * a0 + a1 * a1)
        self.units.append(units)
        self.dirs.append(torch.stack([-a1, a0], dim=1) / norm.unsqueeze(1))
        self.count += k
        return ids


PAD_SIDE = -(1 << 62)
"""The side label of padding slots (real ones: cut ids >= 0, the domain's sides -1, -2, ...)."""


def pad_polys(verts: Tensor, side: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Widen padded polygons to ``width`` slots; new slots repeat vertex 0."""
    grow = width - verts.shape[1]
    if grow <= 0:
        return verts, side
    verts = torch.cat([verts, verts[:, :1].expand(-1, grow, -1)], dim=1)
    side = torch.nn.functional.pad(side, (0, grow), value=PAD_SIDE)
    return verts, side


def _line_coefficients(
    spec: Nonlinearity, vals: Tensor, pair: Tensor, step: Tensor, state: Tensor
) -> Tensor:
    """(a0, a1, b) of each polygon's test line; vals is :attr:`Crossings.vals`."""
    if spec.kind == "maxpool":
        return vals[pair, :, step + 1] - vals[pair, :, state.long()]
    lines = vals[pair, :, 0]
    if spec.kind == "hardtanh":
        # float64 bounds: torch.where on Python floats gives float32 (-0.3 -> -0.300000012)
        lines[:, 2] -= torch.where(step == 0, lines.new_tensor(spec.lo), lines.new_tensor(spec.hi))
    return lines


def _codes(spec: Nonlinearity, step: Tensor) -> Tensor:
    """The state a unit takes on the positive side of test ``step``."""
    if spec.kind == "maxpool":
        return (step + 1).to(torch.uint8)
    if spec.kind == "hardtanh":
        return (step + 1).to(torch.uint8)
    return torch.ones_like(step, dtype=torch.uint8)


def _snap(f: Tensor, a0: Tensor, a1: Tensor, tol: float) -> Tensor:
    tau = tol * torch.sqrt(a0 * a0 + a1 * a1)
    return torch.where(f.abs() <= tau[:, None], torch.zeros_like(f), f)


def split_layer(
    spec: Nonlinearity, cells: Polys, state0: Tensor, cross: Crossings, tol: float, cuts: CutLog
) -> tuple[Polys, Tensor]:
    """Split every cell by the units of one nonlinearity that cross it.

    Parameters
    ----------
    cells : Polys
        The cells of the partition by the earlier nonlinearities.
    state0, cross : Tensor (cells, units), Crossings
        From :func:`crossings`.

    Returns
    -------
    Polys whose ``parent`` indexes ``cells``, and their states (P, units) uint8. A child
    differs from ``state0`` of its cell only in crossing units.
    """
    dev = state0.device
    p = len(cells)
    n_steps = spec.n_steps
    if len(cross) == 0:
        return Polys(cells.verts, cells.n, cells.side, torch.arange(p, device=dev)), state0
    if n_steps == 1 and spec.kind != "maxpool":
        return _split_line_units(spec, cells, state0, cross, tol, cuts)
    if spec.kind == "maxpool" and MAX_TOURNAMENTS_AT_ONCE:
        from geomstore.engine.tournaments import split_max

        return split_max(spec, cells, state0, cross, tol, cuts)
    per_cell = bincount(cross.cell, p) * n_steps
    # test list per cell: (pair, step) in order, padded
    rounds = int(per_cell.max().item())
    start = torch.cumsum(per_cell, 0) - per_cell
    t_cell = cross.cell.repeat_interleave(n_steps)
    t_pair = torch.arange(len(cross), device=dev).repeat_interleave(n_steps)
    t_step = torch.arange(n_steps, device=dev).repeat(len(cross))
    t_rank = torch.arange(t_cell.numel(), device=dev) - start[t_cell]
    tests_pair = torch.full((p, rounds), -1, dtype=torch.long, device=dev)
    tests_step = torch.zeros((p, rounds), dtype=torch.long, device=dev)
    tests_pair[t_cell, t_rank] = t_pair
    tests_step[t_cell, t_rank] = t_step

    buf = _Buffers(cells, state0, tests_pair, tests_step, per_cell)
    refilter = spec.n_steps == 1 and spec.kind != "maxpool"
    r = 0
    next_refilter = 8
    while r < rounds:
        if refilter and r == next_refilter and rounds - r >= 8:
            rounds = buf.refilter(cross, r, tol)
            r, next_refilter = 0, 2 * next_refilter
            continue
        m = buf.count
        act = torch.nonzero(buf.tcount[:m] > r, as_tuple=True)[0]
        if act.numel() == 0:
            r += 1
            continue
        pair = buf.tunit[act, r]
        unit = cross.unit[pair]
        step = buf.tstep[act, r]
        r += 1
        cur = buf.states[act, unit]
        lines = _line_coefficients(spec, cross.vals, pair, step, cur)
        a0, a1, b = lines[:, 0], lines[:, 1], lines[:, 2]
        va = buf.verts[act]
        f = torch.baddbmm(b[:, None, None], va, lines[:, :2, None])[:, :, 0]
        f = _snap(f, a0, a1, tol)
        pos = (f > 0).any(dim=1)
        neg = (f < 0).any(dim=1)
        code = _codes(spec, step)
        whole = pos & ~neg
        buf.states[act[whole], unit[whole]] = code[whole]
        spl = torch.nonzero(pos & neg, as_tuple=True)[0]
        if spl.numel() == 0:
            continue
        rows = act[spl]
        ids = cuts.add(spec.unit_offset + unit[spl], a0[spl], a1[spl])
        cv, cn, cs = clip_both(va[spl], f[spl], buf.n[rows], buf.side[rows], ids)
        buf.widen(int(cv.shape[1]))
        w = buf.verts.shape[1]
        k = int(spl.shape[0])
        pv, ps = pad_polys(cv[:k], cs[:k], w)
        nv, ns = pad_polys(cv[k:], cs[k:], w)
        pn, nn_ = cn[:k], cn[k:]
        neg_states = buf.states[rows]
        buf.verts[rows] = pv
        buf.n[rows] = pn
        buf.side[rows] = ps
        buf.states[rows, unit[spl]] = code[spl]
        buf.append(rows, nv, nn_, ns, neg_states)
    m = buf.count
    return Polys(buf.verts[:m], buf.n[:m], buf.side[:m], buf.cell[:m]), buf.states[:m]


def _split_line_units(
    spec: Nonlinearity, cells: Polys, state0: Tensor, cross: Crossings, tol: float, cuts: CutLog
) -> tuple[Polys, Tensor]:
    """Line units: every cell's arrangement at once; rounds for cells not in general position.

    Arrangements dispatch a fixed number of operations per layer; rounds dispatch about
    100 per round but do less arithmetic. Which one is faster depends on the device:
    see :data:`ARRANGEMENT_DEVICES`.
    """
    from geomstore.engine.arrangement import arrangements

    if len(cells) > 1 and cells.verts.device.type not in ARRANGEMENT_DEVICES:
        return _split_lines(spec, cells, state0, cross, tol, cuts)
    res = arrangements(cells, state0, cross, tol, cuts, spec.unit_offset)
    if res is None:
        return _split_lines(spec, cells, state0, cross, tol, cuts)
    faces, states, left = res
    if not bool(left.any()):
        return faces, states
    idx = torch.nonzero(left, as_tuple=True)[0]
    sel = left[cross.cell]
    renum = torch.cumsum(left, 0) - 1
    sub = Polys(cells.verts[idx], cells.n[idx], cells.side[idx], idx)
    sub_cross = Crossings(renum[cross.cell[sel]], cross.unit[sel], cross.vals[sel])
    rest, rest_states = _split_lines(spec, sub, state0[idx], sub_cross, tol, cuts)
    width = max(int(faces.verts.shape[1]), int(rest.verts.shape[1]))
    fv, fs = pad_polys(faces.verts, faces.side, width)
    rv, rs = pad_polys(rest.verts, rest.side, width)
    return (
        Polys(
            torch.cat([fv, rv]),
            torch.cat([faces.n, rest.n]),
            torch.cat([fs, rs]),
            torch.cat([faces.parent, idx[rest.parent]]),
        ),
        torch.cat([states, rest_states]),
    )


ARRANGEMENT_DEVICES: tuple[str, ...] = ("cuda",)
"""Device types on which every layer of line units is split by arrangements.

Elsewhere only a single cell (the first layer's domain) is: on a GPU each operation is
a kernel launch, so the arrangements' fixed number of operations per layer wins; on this
project's 2-core CPU, rounds took the same CPU time as arrangements or less on the
benchmark MLPs after the first layer (2-256-256-1: 0.44 s against 0.54 s, one thread).
Both give the same partition.
"""

_HIGH = -(1 << 32)  # the float64 bits that order non-negative distances (to ~1e-6)
_MAX = (1 << 63) - 1


def _split_lines(
    spec: Nonlinearity, cells: Polys, state0: Tensor, cross: Crossings, tol: float, cuts: CutLog
) -> tuple[Polys, Tensor]:
    """:func:`split_layer` for units with one line each (ReLU-like), in few large operations.

    Every round evaluates all remaining (polygon, line) pairs at once: lines that miss a
    polygon settle the unit's state and leave its list; each polygon that still meets a
    line is split by the one through its middle (fewest rounds), and both children keep
    the rest of the list. The number of rounds is the longest chain of splits, and the
    number of tensor operations per round does not depend on the number of polygons or
    pairs.
    """
    lines = cross.vals[:, :, 0]  # (T, 3): a0, a1, b
    # unit normals: values are distances, so the tolerance is one number for all lines
    unit_lines = lines / torch.hypot(lines[:, 0], lines[:, 1]).unsqueeze(1)
    ul = unit_lines.unsqueeze(2)  # index_select below copies rows out contiguous
    a, b = ul[:, :2], ul[:, 2:]
    units = cross.unit
    n_units = int(state0.shape[1])
    buf = _Grow(cells, state0, cross)
    pp, pt = cross.cell, torch.arange(len(cross), device=lines.device)
    split_tests: list[Tensor] = []
    first_id = cuts.count
    n_cuts = 0
    while pp.numel():
        va = buf.verts.index_select(0, pp)
        f = torch.baddbmm(b.index_select(0, pt), va, a.index_select(0, pt)).squeeze(2)
        f.masked_fill_(f.abs() <= tol, 0.0)
        lo, hi = torch.aminmax(f, dim=1)
        pos, neg = hi > 0, lo < 0
        key = units.index_select(0, pt).add_(pp, alpha=n_units)  # flat (polygon, unit)
        buf.flat.index_fill_(0, key[pos > neg], 1)  # the line misses: settled
        ci = torch.nonzero(pos & neg).squeeze(1)
        if ci.numel() == 0:
            break
        cp, ct = pp[ci], pt[ci]
        # split each polygon by the crossing line nearest its middle (fewest rounds);
        # the key orders by distance (float bits, top half) and breaks ties by position
        mid = (hi + lo).abs_()[ci]  # twice the line's distance from the middle
        ckey = (mid.view(torch.int64) & _HIGH) | ci
        best = torch.full((buf.count,), _MAX, dtype=torch.int64, device=pp.device)
        chosen = ckey == best.scatter_reduce_(0, cp, ckey, "amin")[cp]
        fi, sp, st = ci[chosen], cp[chosen], ct[chosen]
        k = int(sp.shape[0])
        ids = torch.arange(first_id + n_cuts, first_id + n_cuts + k, device=pp.device)
        n_cuts += k
        split_tests.append(st)
        children = clip_both(va[fi], f[fi], buf.n[sp], buf.side[sp], ids)
        m = buf.count
        buf.split(sp, children, key[fi])
        # the other crossing lines stay on both children's lists (new ids: m, m + 1, ...)
        keep = ~chosen
        kp, kt = cp[keep], ct[keep]
        kn = torch.searchsorted(sp, kp).add_(m)
        pp, pt = torch.cat([kp, kn]), torch.cat([kt, kt])
    if split_tests:
        tests = torch.cat(split_tests)
        cuts.add(spec.unit_offset + units[tests], lines[tests, 0], lines[tests, 1])
    m = buf.count
    return Polys(buf.verts[:m], buf.n[:m], buf.side[:m], buf.cell[:m]), buf.states[:m]


MAX_TOURNAMENTS_AT_ONCE = True
"""Max units split by :func:`geomstore.engine.tournaments.split_max` (False: one tournament
test per polygon per round, the earlier way; kept for comparison)."""


def clip_both(
    v: Tensor, f: Tensor, n: Tensor, side: Tensor, cut: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Both children of convex polygons split by the zero line of f, in one batch.

    Parameters
    ----------
    v : Tensor (S, W, 2)
        Counter-clockwise vertices with W > n: slots from n on repeat vertex 0, so the
        side starting at slot i always ends at slot i + 1.
    f : Tensor (S, W)
        The line's values at the vertices, already snapped (0 within the tolerance).
    n, side, cut : Tensor (S,), (S, W), (S,)
        Vertex counts, side labels, and the label of each polygon's new chord.

    Returns
    -------
    (verts, n, side) of 2S polygons: the parts where f >= 0 first, then those where
    f <= 0, each with at least one padding slot. A polygon the line does not cross
    comes back whole on its side (and as its on-line vertices, n < 3, on the other).

    Examples
    --------
    >>> import torch
    >>> sq = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    >>> v, n, side = clip_both(sq, sq[..., 0] - 0.5, torch.tensor([4]), -torch.ones(1, 5,
    ...     dtype=torch.long), torch.tensor([9]))
    >>> n.tolist(), v[0, :3].tolist()
    ([4, 4], [[0.5, 0.0], [1.0, 0.0], [1.0, 1.0]])
    """
    s, w = f.shape
    sg = f.sign()
    c = torch.stack([sg, sg.neg()])  # (2, S, W): the sign as each child sees it
    c0, c1 = c[..., :-1], c[..., 1:]
    f0 = f[:, :-1]
    v0 = v[:, :-1]
    t = f0 / (f0 - f[:, 1:])
    x = torch.addcmul(v0, t.unsqueeze(2), v[:, 1:] - v0)
    pts = torch.stack([v0, x], 2).view(s, 2 * w - 2, 2)
    valid = torch.arange(w - 1, device=f.device) < n.unsqueeze(1)
    # each child keeps its vertices on its side and every crossing of the line
    emit = torch.stack([(c0 >= 0) & valid, c0 * c1 < 0], 3).view(2, s, 2 * w - 2)
    cutc = cut.view(1, s, 1)
    side0 = side[:, :-1]
    # a vertex on the line whose next vertex is on the other side starts the chord
    lab_v = torch.where(torch.add(c1, c0, alpha=3) == -1, cutc, side0)  # c0 = 0, c1 = -1
    lab_x = torch.where(c0 > 0, cutc, side0)
    lab = torch.stack([lab_v, lab_x], 3).view(2, s, 2 * w - 2)
    cnt = emit.sum(2)
    nw = max(w, int(cnt.max().item()) + 1)
    # stable sort of "not emitted" keeps the emitted points first, in order; the sorted
    # keys mark the padding, which repeats vertex 0
    pad, idx = torch.sort(~emit, dim=2, stable=True)
    idx = idx[:, :, :nw]
    idx = torch.where(pad[:, :, :nw], idx[:, :, :1], idx)
    out_v = pts.expand(2, s, 2 * w - 2, 2).gather(2, idx.unsqueeze(3).expand(2, s, nw, 2))
    return out_v.view(2 * s, nw, 2), cnt.view(2 * s), lab.gather(2, idx).view(2 * s, nw)


class _Grow:
    """Growable polygons, their parent cells and states, for :func:`_split_lines` and the
    max-pool tournaments."""

    def __init__(self, cells: Polys, state0: Tensor, cross: Crossings) -> None:
        p = len(cells)
        # k lines make at most 1 + k + k (k - 1) / 2 faces: take that bound when it is
        # modest, so that the buffers never grow (growing costs operations and copies)
        k = bincount(cross.cell, p)
        bound = int((1 + k * (k + 1) // 2).sum().item())  # 1 + k + k (k - 1) / 2
        cap = p + 2 * len(cross) + 16
        cap = bound if bound <= 4 * cap else cap
        width = int(cells.n.max().item()) + 1
        verts, side = pad_polys(cells.verts, cells.side, width)
        self.verts = _alloc(verts, cap)
        self.side = _alloc(side, cap)
        self.n = _alloc(cells.n, cap)
        self.cell = _alloc(torch.arange(p, device=state0.device), cap)
        self.states = _alloc(state0, cap)
        self.flat = self.states.view(-1)
        self.count = p

    def reserve(self, rows: int, width: int) -> None:
        """Room for ``rows`` polygons of ``width`` slots."""
        if rows > self.n.shape[0]:
            cap = max(rows, 2 * self.n.shape[0])
            for name in ("verts", "side", "n", "cell", "states"):
                setattr(self, name, _alloc(getattr(self, name), cap))
            self.flat = self.states.view(-1)
        if width > self.verts.shape[1]:
            self.verts, self.side = pad_polys(self.verts, self.side, width)

    def split(
        self,
        rows: Tensor,
        children: tuple[Tensor, Tensor, Tensor],
        key: Tensor,
        code: Tensor | None = None,
    ) -> None:
        """Positive children replace ``rows``, negative ones are appended; ``key`` is
        row x units + unit of the splitting line, whose state on the positive side is
        ``code`` (1 when None)."""
        new, _ = self.put(rows, *children)
        self.cell.index_copy_(0, new, self.cell[rows])
        self.states.index_copy_(0, new, self.states[rows])
        if code is None:
            self.flat.index_fill_(0, key, 1)
        else:
            self.flat.index_put_((key,), code)

    def put(self, rows: Tensor, verts: Tensor, n: Tensor, side: Tensor) -> tuple[Tensor, Tensor]:
        """The first ``len(rows)`` polygons replace ``rows``, the rest are appended; returns
        the appended rows and all the rows written. Cells and states are the caller's."""
        k = int(verts.shape[0]) - int(rows.shape[0])
        m = self.count
        self.reserve(m + k, int(verts.shape[1]))
        verts, side = pad_polys(verts, side, int(self.verts.shape[1]))
        new = torch.arange(m, m + k, device=rows.device)
        dest = torch.cat([rows, new])
        self.verts.index_copy_(0, dest, verts)
        self.side.index_copy_(0, dest, side)
        self.n.index_copy_(0, dest, n)
        self.count = m + k
        return new, dest


class _Buffers:
    """Growable storage for one split_layer call: polygons, states and their test lists."""

    def __init__(
        self, cells: Polys, state0: Tensor, tunit: Tensor, tstep: Tensor, tcount: Tensor
    ) -> None:
        p = len(cells)
        cap = max(16, 4 * p)
        dev = cells.verts.device
        verts, side = pad_polys(cells.verts, cells.side, int(cells.n.max().item()) + 1)
        self.verts = _alloc(verts, cap)  # one spare slot (see clip_both)
        self.side = _alloc(side, cap)
        self.n = _alloc(cells.n, cap)
        self.cell = _alloc(torch.arange(p, device=dev), cap)
        self.states = _alloc(state0, cap)
        self.tunit = _alloc(tunit, cap)
        self.tstep = _alloc(tstep, cap)
        self.tcount = _alloc(tcount, cap)
        self.count = p

    _FIELDS = ("verts", "side", "n", "cell", "states", "tunit", "tstep", "tcount")

    def widen(self, width: int) -> None:
        if width > self.verts.shape[1]:
            self.verts, self.side = pad_polys(self.verts, self.side, width)

    def append(self, src: Tensor, verts: Tensor, n: Tensor, side: Tensor, states: Tensor) -> None:
        """Add children that copy the cell and test list of rows ``src``."""
        k = int(n.shape[0])
        need = self.count + k
        if need > self.n.shape[0]:
            cap = max(need, 2 * self.n.shape[0])
            for name in self._FIELDS:
                setattr(self, name, _alloc(getattr(self, name), cap))
        sl = slice(self.count, need)
        self.cell[sl] = self.cell[src]
        self.tunit[sl] = self.tunit[src]
        self.tstep[sl] = self.tstep[src]
        self.tcount[sl] = self.tcount[src]
        self.verts[sl], self.n[sl], self.side[sl], self.states[sl] = verts, n, side, states
        self.count = need

    def refilter(self, cross: Crossings, r: int, tol: float) -> int:
        """Drop remaining tests whose line misses the polygon; settle those units' states.

        Returns the new number of rounds (lists restart at position 0).
        """
        m = self.count
        rem = self.tunit.shape[1] - r
        if rem <= 0:
            self.tcount[:m] = 0
            return 0
        units = self.tunit[:m, r:]
        has = torch.arange(rem, device=units.device)[None, :] < (self.tcount[:m, None] - r)
        # evaluate only the real (polygon, test) pairs, not the padded rectangle
        rows, cols = torch.nonzero(has, as_tuple=True)
        pair = units[rows, cols]
        pu = cross.unit[pair]
        lines = cross.vals[pair, :, 0]  # (pairs, 3)
        f = torch.baddbmm(lines[:, 2, None, None], self.verts[rows], lines[:, :2, None])[..., 0]
        tau = tol * torch.sqrt(lines[:, 0] ** 2 + lines[:, 1] ** 2)
        pos = f.amax(dim=1) > tau
        neg = f.amin(dim=1) < -tau
        settle = pos & ~neg
        self.states[rows[settle], pu[settle]] = 1
        crossing = pos & neg
        cnt = torch.bincount(rows[crossing], minlength=m)
        width = int(cnt.max().item()) if m else 0
        cr, cu = rows[crossing], pair[crossing]
        start = torch.cumsum(cnt, 0) - cnt
        rank = torch.arange(cr.numel(), device=cr.device) - start[cr]
        self.tunit = torch.zeros(
            (self.n.shape[0], max(width, 1)), dtype=torch.long, device=units.device
        )
        self.tstep = torch.zeros_like(self.tunit)
        self.tunit[cr, rank] = cu
        self.tcount[:m] = cnt
        return width


def _alloc(t: Tensor, cap: int) -> Tensor:
    """A tensor of ``cap`` rows holding ``t`` in its first rows (the rest uninitialised)."""
    out = t.new_empty((cap, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out
