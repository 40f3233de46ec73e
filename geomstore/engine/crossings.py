"""Which units cross each cell: the states of the units constant on a cell and the
(cell, unit) pairs whose zero sets (or max-pool winner changes) cut it.

A line unit is tested against the cell's bounding circle first, then at the vertices of
the cells it may cross; a max unit compares its candidates' affine forms at the vertices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from geomstore.engine.graph import Nonlinearity

__all__ = ["Crossings", "crossings"]


@dataclass
class Crossings:
    """The (cell, unit) pairs whose zero set crosses the cell, sorted by cell then unit.

    ``vals`` (pairs, 3, k) holds the affine form (slope0, slope1, value) of the unit's
    input: of its k max-pool candidates, or k = 1 for line units.
    """

    cell: Tensor
    unit: Tensor
    vals: Tensor

    def __len__(self) -> int:
        return int(self.cell.shape[0])

    @staticmethod
    def concat(parts: list[tuple[int, Crossings]]) -> Crossings:
        """Join the crossings of consecutive blocks of cells; (first cell, crossings) each."""
        return Crossings(
            torch.cat([c.cell + off for off, c in parts]),
            torch.cat([c.unit for _, c in parts]),
            torch.cat([c.vals for _, c in parts]),
        )

    def find(self, cell: Tensor, unit: Tensor, n_units: int) -> Tensor:
        """Pair index of each (cell, unit); every one must be a crossing pair."""
        keys = self.cell * n_units + self.unit
        return torch.searchsorted(keys, cell * n_units + unit)


def crossings(
    spec: Nonlinearity, coef: Tensor, verts: Tensor, n: Tensor, tol: float
) -> tuple[Tensor, Crossings]:
    """States of the units constant on each cell (0 for the others) and the crossing pairs."""
    state0, crossing = _initial_states(spec, coef, verts, n, tol)
    cell, unit = torch.nonzero(crossing, as_tuple=True)
    if spec.kind == "maxpool":
        assert spec.candidates is not None
        vals = coef[cell[:, None], :, spec.candidates[unit]].transpose(1, 2)
    else:
        vals = coef[cell, :, unit][:, :, None]
    return state0, Crossings(cell, unit, vals)


def _initial_states(
    spec: Nonlinearity, coef: Tensor, verts: Tensor, n: Tensor, tol: float
) -> tuple[Tensor, Tensor]:
    """States of units constant on each cell, and which units need line tests (crossing)."""
    if spec.kind == "maxpool":
        valid = torch.arange(verts.shape[1], device=verts.device)[None, :] < n[:, None]
        return _initial_states_max(spec, coef, verts, valid, tol)
    return _initial_states_lines(spec, coef, verts, tol)


def _initial_states_lines(
    spec: Nonlinearity, coef: Tensor, verts: Tensor, tol: float
) -> tuple[Tensor, Tensor]:
    """Line units (ReLU-like, hard-tanh): a circle pretest, then exact tests on candidates.

    A unit whose line misses the polygon's bounding circle (by more than the tolerance)
    is constant on the cell, with the sign it has at the centre; only the other
    (cell, unit) pairs are evaluated at the vertices.
    """
    # padded slots repeat vertex 0: their mean is still inside, their extremes the vertices'
    centre = verts.mean(dim=1, keepdim=True)  # (P, 1, 2)
    radius = (verts - centre).norm(dim=2).amax(dim=1, keepdim=True)  # (P, 1)
    norm = torch.hypot(coef[:, 0], coef[:, 1])  # (P, N); torch.norm over dim 1 is slow
    fc = torch.baddbmm(coef[:, 2:], centre, coef[:, :2]).squeeze(1)  # value at the centre
    reach = norm * (radius + 2 * tol)
    thresholds = [spec.lo, spec.hi] if spec.kind == "hardtanh" else [0.0]
    states: Tensor | None = None
    crossing = torch.zeros(fc.shape, dtype=torch.bool, device=fc.device)
    for thr in thresholds:
        g = fc - thr if thr else fc
        rows, cols = torch.nonzero(g.abs() <= reach, as_tuple=True)
        c = coef[rows, :, cols]  # (pairs, 3)
        b = c[:, 2:, None] - thr if thr else c[:, 2:, None]
        f = torch.baddbmm(b, verts[rows], c[:, :2, None])
        tau = tol * norm[rows, cols]
        pos = f.amax(dim=(1, 2)) > tau
        neg = f.amin(dim=(1, 2)) < -tau
        above = g > 0
        above[rows, cols] = pos & ~neg  # False where the line crosses
        if len(thresholds) == 1:
            crossing[rows, cols] = pos & neg
            return above.to(torch.uint8), crossing
        crossing[rows, cols] |= pos & neg
        states = above.to(torch.uint8) if states is None else states + above
    assert states is not None
    # a unit crossing at one threshold may be above the other: its state comes from the split
    return torch.where(crossing, 0, states), crossing


def _initial_states_max(
    spec: Nonlinearity, coef: Tensor, verts: Tensor, valid: Tensor, tol: float
) -> tuple[Tensor, Tensor]:
    """Max units: a circle pretest, then the vertex test on the (cell, unit) pairs left.

    A unit is constant on a cell when its winner beats every other candidate at every
    vertex by the two forms' tolerances. Around the cell's bounding circle the winner at
    the centre does so wherever ``(f_b - f_j)(centre) - |grad(f_b - f_j)| (r + 2 tol)``
    clears them; only the pairs where that bound fails are evaluated at the vertices.
    The winner is the one at vertex 0 there; where the pretest holds the two agree
    (a tie at the centre passes only for identical forms, which argmax breaks alike).
    """
    assert spec.candidates is not None
    cand = spec.candidates  # (U, k)
    centre = verts.mean(dim=1, keepdim=True)  # (P, 1, 2); padded slots repeat vertex 0
    radius = (verts - centre).norm(dim=2).amax(dim=1)  # (P,)
    a0, a1 = coef[:, 0], coef[:, 1]
    tau = tol * torch.hypot(a0, a1)  # (P, N_in)
    fc = torch.baddbmm(coef[:, 2:], centre, coef[:, :2]).squeeze(1)[:, cand]  # (P, U, k)
    best = fc.argmax(dim=2, keepdim=True)  # (P, U, 1)
    cb = cand.expand(fc.shape[0], -1, -1).gather(2, best)  # (P, U, 1) winner's input
    c0, c1, tc = a0[:, cand], a1[:, cand], tau[:, cand]
    slope = torch.hypot(c0.gather(2, best) - c0, c1.gather(2, best) - c1)
    lower = fc.gather(2, best) - fc - slope * (radius + 2 * tol)[:, None, None]
    sure = (lower >= tc + tc.gather(2, best)) | (cand[None] == cb)
    rows, units = torch.nonzero(~sure.all(dim=2), as_tuple=True)
    states = best.squeeze(2).to(torch.uint8)
    crossing = torch.zeros(states.shape, dtype=torch.bool, device=states.device)
    if rows.numel():
        cu = cand[units]  # (M, k)
        c = coef[rows[:, None], :, cu].transpose(1, 2)  # (M, 3, k)
        f = torch.baddbmm(c[:, 2:], verts[rows], c[:, :2])  # (M, V, k)
        t = tau[rows[:, None], cu]  # (M, k)
        b = f[:, 0].argmax(dim=1, keepdim=True)  # winner at vertex 0, (M, 1)
        fb = f.gather(2, b[:, None].expand(-1, f.shape[1], 1))
        margin = fb - f - (t + t.gather(1, b))[:, None]
        # >= : a candidate equal to the winner on the whole cell (zero after a dead ReLU,
        # say: both forms vanish, and so do their tolerances) never changes the maximum;
        # with > such units counted as crossing and cost VGG-11 thousands of idle rounds
        dup = cu == cu.gather(1, b)  # (M, k): the winner itself or a copy
        ok = (margin >= 0) | dup[:, None] | ~valid[rows][:, :, None]
        constant = ok.all(dim=2).all(dim=1)
        states[rows, units] = torch.where(constant, b.squeeze(1), 0).to(torch.uint8)
        crossing[rows, units] = ~constant
    return states, crossing
