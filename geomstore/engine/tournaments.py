"""Max-pool units: every unit's tournament at once, in rounds of batched splits.

A max unit's state is the winner of a tournament: test ``j`` compares candidate ``j + 1``
with the current winner (its line depends on the state so far). Each round evaluates the
current test of every remaining (polygon, unit) pair at once. Where the line misses the
polygon the test is settled (candidate ``j + 1`` wins everywhere or nowhere) and the pair
moves on to its next test; each polygon that some test crosses is split by the one whose
line passes nearest its middle, the positive child taking state ``j + 1``, and both
children carry the other pairs. The tests of one unit stay in tournament order, so every
piece ends with the states the per-test rounds give; the rounds are the longest chain of
tests and splits of one polygon instead of all tests of all its units one after the other
(the benchmark CNN: 1,870 operations per 1,000 regions before, see
``benchmarks/partition.py``).

On a GPU the last rounds of a layer run on the host (:data:`HOST_TAIL_PAIRS`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from geomstore.engine.graph import Nonlinearity
from geomstore.engine.split import (
    _HIGH,
    _MAX,
    Crossings,
    CutLog,
    Polys,
    _Grow,
    clip_both,
)

__all__ = ["HOST_TAIL_PAIRS", "split_max"]

HOST_TAIL_PAIRS = 2048
"""On a GPU, a layer's rounds finish on the host once this many (polygon, test) pairs or
fewer remain. A layer's last rounds split a few polygons each (LeNet-5's first max-pool
layer: 13,642 pairs in its widest round, 330, 56 and 7 in its last three), and a GPU costs
about 20 us of host time per operation whatever its size, the CPU a few: the tail's
polygons go over, and their pieces come back, in a few copies each way."""


def split_max(
    spec: Nonlinearity, cells: Polys, state0: Tensor, cross: Crossings, tol: float, cuts: CutLog
) -> tuple[Polys, Tensor]:
    """:func:`~geomstore.engine.split.split_layer` for max units (see the module)."""
    buf = _Grow(cells, state0, cross)
    pt = torch.arange(len(cross), device=state0.device)
    host_tail = _tail_to_host(state0.device)
    _rounds(spec, buf, cross, cross.cell, pt, torch.ones_like(pt), tol, cuts, host_tail)
    m = buf.count
    return Polys(buf.verts[:m], buf.n[:m], buf.side[:m], buf.cell[:m]), buf.states[:m]


def _tail_to_host(device: torch.device) -> bool:
    """Whether rounds on ``device`` hand their tail to the host: on a GPU."""
    return device.type != "cpu"


def _rounds(
    spec: Nonlinearity,
    buf: _Grow,
    cross: Crossings,
    pp: Tensor,
    pt: Tensor,
    pc: Tensor,
    tol: float,
    cuts: CutLog,
    host_tail: bool,
) -> None:
    """Split ``buf``'s polygons in place until every (polygon ``pp``, pair ``pt``) has
    run its tests from candidate ``pc`` on, and log the cuts. ``pp`` is sorted."""
    units = cross.unit
    n_units = int(buf.states.shape[1])
    n_steps = spec.n_steps
    dev = pp.device
    vals = cross.vals  # (pairs, 3, candidates)
    ar = torch.arange(2 * int(pp.shape[0]), device=dev)  # pair positions in a round (grows)
    done: list[Tensor] = []  # (polygon, pair, key, candidate, winner) of each split
    first_id = cuts.count
    n_cuts = 0
    while pp.numel():
        t = int(pp.shape[0])
        if host_tail and t <= HOST_TAIL_PAIRS:
            _log(spec, cross, done, cuts)
            _finish_on_host(spec, buf, cross, (pp, pt, pc), tol, cuts)
            return
        key = units.index_select(0, pt).add_(pp, alpha=n_units)  # flat (polygon, unit)
        cur = buf.flat[key]
        win = cur.long()
        lines = (vals[pt, :, pc] - vals[pt, :, win]).unsqueeze(2)
        va = buf.verts.index_select(0, pp)
        f = torch.baddbmm(lines[:, 2:], va, lines[:, :2]).squeeze(2)
        norm = torch.linalg.vector_norm(lines[:, :2], dim=1)  # (T, 1)
        f.masked_fill_(f.abs() <= tol * norm, 0.0)
        lo, hi = torch.aminmax(f, dim=1)
        pos, neg = hi > 0, lo < 0
        # the candidate beats the winner on the whole polygon where pos and not neg
        buf.flat.index_put_((key,), torch.where(pos > neg, pc.to(torch.uint8), cur))
        crossing = pos & neg
        # split each polygon by the crossing test nearest its middle (fewest rounds);
        # the key orders by distance (float bits, top half), then by position; the
        # other pairs' keys are _MAX, above the polygons' start (_MAX - 1)
        if t > ar.shape[0]:
            ar = torch.arange(2 * t, device=dev)
        mid = (hi + lo).abs_().div_(norm.squeeze(1))
        ckey = (mid.view(torch.int64) & _HIGH) | ar[:t]
        ckey = torch.where(crossing, ckey, _MAX)
        m = buf.count
        best = torch.full((m,), _MAX - 1, dtype=torch.int64, device=dev)
        bp = best.scatter_reduce_(0, pp, ckey, "amin").index_select(0, pp)
        chosen = ckey == bp
        nxt = pc + (chosen >= crossing)  # settled tests and the splits move on
        fi = torch.nonzero(chosen).squeeze(1)  # one sync a round for the splits ...
        k = int(fi.shape[0])
        if k == 0:
            keep = torch.nonzero(nxt <= n_steps).squeeze(1)
            pp, pt, pc = pp[keep], pt[keep], nxt[keep]
            continue
        split = torch.stack([pp, pt, key, pc, win]).index_select(1, fi)
        done.append(split)
        sp = split[0]  # sorted, as pp is
        ids = torch.arange(first_id + n_cuts, first_id + n_cuts + k, device=dev)
        n_cuts += k
        children = clip_both(va[fi], f[fi], buf.n[sp], buf.side[sp], ids)
        # the positive child takes the candidate, and both move on
        buf.split(sp, children, split[2], split[3].to(torch.uint8))
        # ... and one for what goes on: the live pairs, then again those of a split
        # polygon, for its negative child (new ids m, m + 1, ... in the order of sp)
        alive = nxt <= n_steps
        sel = torch.nonzero(torch.cat([alive, alive & (bp < _MAX - 1)])).squeeze(1)
        newp = torch.searchsorted(sp, pp).add_(m)  # used only where pp was split
        both = torch.stack([pp, newp, pt, pt, nxt, nxt]).view(3, 2 * t)
        pp, pt, pc = both.index_select(1, sel).unbind()
    _log(spec, cross, done, cuts)


def _log(spec: Nonlinearity, cross: Crossings, done: list[Tensor], cuts: CutLog) -> None:
    """Log the cuts of ``done``'s splits, in the order their ids were given."""
    if done:
        _, pair, _, cand, winner = torch.cat(done, 1)
        cut = cross.vals[pair, :, cand] - cross.vals[pair, :, winner]  # (cuts, 3)
        cuts.add(spec.unit_offset + cross.unit[pair], cut[:, 0], cut[:, 1])


def _finish_on_host(
    spec: Nonlinearity,
    buf: _Grow,
    cross: Crossings,
    pairs: tuple[Tensor, ...],
    tol: float,
    cuts: CutLog,
) -> None:
    """The rounds left, on the host: the polygons of the (polygon, pair, candidate)
    ``pairs`` go over with the states of the units still in play (a layer's rows can be
    tens of thousands of units wide), and their pieces come back in place of them (the
    first) and after the others, each with the rest of its polygon's states."""
    pp, pt, pc = pairs
    dev, host = pp.device, torch.device("cpu")
    rows, cell = torch.unique_consecutive(pp, return_inverse=True)  # pp is sorted
    cols, unit = torch.unique(cross.unit[pt], return_inverse=True)  # units in play
    sub = Crossings(cell.to(host), unit.to(host), cross.vals[pt].to(host))
    verts, n, side = (t[rows].to(host) for t in (buf.verts, buf.n, buf.side))
    here = Polys(verts, n, side, rows.to(host))
    tail = _Grow(here, buf.states.index_select(0, rows).index_select(1, cols).to(host), sub)
    logged = len(cuts.units)
    ht = torch.arange(len(sub))
    _rounds(spec, tail, sub, sub.cell, ht, pc.to(host), tol, cuts, host_tail=False)
    for i in range(logged, len(cuts.units)):  # units as numbered in play, back to the layer's
        u = cols.index_select(0, cuts.units[i].to(dev) - spec.unit_offset) + spec.unit_offset
        cuts.units[i], cuts.dirs[i] = u, cuts.dirs[i].to(dev)
    m, r = tail.count, int(rows.shape[0])
    back = [t[:m].to(dev) for t in (tail.verts, tail.n, tail.side, tail.states, tail.cell)]
    verts, n, side, played, parent = back
    states = buf.states.index_select(0, rows.index_select(0, parent)).index_copy_(1, cols, played)
    new, dest = buf.put(rows, verts, n, side)
    buf.states.index_copy_(0, dest, states)
    buf.cell.index_copy_(0, new, buf.cell[rows[parent[r:]]])
