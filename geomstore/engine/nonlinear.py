"""The engine's unit kinds: what a piecewise-linear nonlinearity does to a region.

Units and patterns
------------------
Nonlinearities are numbered in topological order (``layer`` 0, 1, ...). A unit is one
output element of a nonlinearity for one input sample, numbered in C order (``neuron``).
Each unit has a discrete state: ReLU-like units 0 (inactive, pre-activation <= 0) or 1;
hard-tanh units 0 (below ``min_val``), 1 (linear) or 2 (above ``max_val``); max units
(max pooling, maxout) the index of the winning candidate (first maximum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx
from torch import Tensor

__all__ = ["Kind", "Nonlinearity"]

Kind = Literal["relu", "leaky", "prelu", "abs", "hardtanh", "maxpool"]


@dataclass
class Nonlinearity:
    """One piecewise-linear nonlinearity of the program and how its units split a region."""

    layer: int
    node: torch.fx.Node
    name: str
    kind: Kind
    slope: Tensor | float = 0.0  # leaky / prelu negative slope (prelu: per channel)
    lo: float = 0.0
    hi: float = 0.0
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    candidates: Tensor | None = None  # max units: (n_units, k) flat input indices
    unit_offset: int = 0

    @property
    def n_units(self) -> int:
        """Units (output elements per sample)."""
        n = 1
        for s in self.out_shape:
            n *= s
        return n

    @property
    def n_steps(self) -> int:
        """Line tests needed to settle one unit's state inside a region."""
        if self.kind == "hardtanh":
            return 2
        if self.kind == "maxpool":
            assert self.candidates is not None
            return int(self.candidates.shape[1]) - 1
        return 1

    @property
    def n_states(self) -> int:
        """Distinct states a unit can take."""
        if self.kind == "hardtanh":
            return 3
        if self.kind == "maxpool":
            assert self.candidates is not None
            return int(self.candidates.shape[1])
        return 2

    @property
    def bits(self) -> int:
        """Bits per unit in the packed activation pattern."""
        return max(1, (self.n_states - 1).bit_length())

    def states_from_values(self, pre: Tensor) -> Tensor:
        """The model's own state of every unit, from pre-activation values (B, *in_shape)."""
        flat = pre.reshape(pre.shape[0], -1)
        if self.kind == "hardtanh":
            return (flat > self.lo).to(torch.uint8) + (flat > self.hi).to(torch.uint8)
        if self.kind == "maxpool":
            assert self.candidates is not None
            vals = flat[:, self.candidates]  # (B, units, k)
            return vals.argmax(dim=2).to(torch.uint8)
        return (flat > 0).to(torch.uint8)

    def margins(self, pre: Tensor) -> Tensor:
        """Distance in value of each unit from a state change (B, units); small = ambiguous."""
        flat = pre.reshape(pre.shape[0], -1)
        if self.kind == "hardtanh":
            return torch.minimum((flat - self.lo).abs(), (flat - self.hi).abs())
        if self.kind == "maxpool":
            assert self.candidates is not None
            vals = flat[:, self.candidates]
            top2 = vals.topk(2, dim=2).values if vals.shape[2] > 1 else None
            if top2 is None:
                return torch.full_like(vals[..., 0], float("inf"))
            gap = top2[..., 0] - top2[..., 1]
            # duplicated candidates (padding) tie by construction and are not ambiguous
            dup = (self.candidates[:, :1] == self.candidates).sum(1) > 1
            return torch.where(dup[None, :] & (gap == 0), float("inf"), gap)
        return flat.abs()

    def apply(self, pre: Tensor, states: Tensor, *, coef: bool = False) -> Tensor:
        """Masked nonlinearity: pre (P, 3, *in_shape), states (P, units) -> (P, 3, *out_shape).

        ``pre`` holds values at three points, or with ``coef`` the affine form (slope0,
        slope1, value): a saturated hard-tanh unit is then (0, 0, bound).
        """
        p = pre.shape[0]
        flat = pre.reshape(p, 3, -1)
        st = states[:, None, :]
        if self.kind == "relu":
            out = flat * st.to(flat.dtype)
        elif self.kind == "abs":
            out = flat * (2 * st.to(flat.dtype) - 1)
        elif self.kind == "leaky":
            out = torch.where(st == 1, flat, flat * float(self.slope))
        elif self.kind == "prelu":
            slope = torch.as_tensor(self.slope, dtype=flat.dtype, device=flat.device)
            if slope.numel() > 1:
                per = self.n_units // slope.numel()
                slope = slope.repeat_interleave(per)
            out = torch.where(st == 1, flat, flat * slope)
        elif self.kind == "hardtanh":
            lo, hi = torch.full_like(flat, self.lo), torch.full_like(flat, self.hi)
            if coef:
                lo[:, :2], hi[:, :2] = 0.0, 0.0
            out = torch.where(st == 0, lo, flat)
            out = torch.where(st == 2, hi, out)
        else:
            assert self.candidates is not None
            cand = self.candidates.to(flat.device)
            idx = cand[torch.arange(cand.shape[0], device=flat.device)[None, :], states.long()]
            out = flat.gather(2, idx[:, None, :].expand(p, 3, -1))
        return out.reshape(p, 3, *self.out_shape)

    def unit_change(self, vals: Tensor, units: Tensor, new: Tensor, old: Tensor) -> Tensor:
        """``unit_values(new) - unit_values(old)`` for units whose state changed (new != old)."""
        if self.kind == "relu":  # on minus off, or off minus on
            z = vals[:, :, 0]
            return torch.where((new == 1)[:, None], z, -z)
        return self.unit_values(vals, units, new) - self.unit_values(vals, units, old)

    def unit_values(self, vals: Tensor, units: Tensor, states: Tensor) -> Tensor:
        """Output (slope0, slope1, value) of each unit in the given state, (pairs, 3).

        ``vals`` (pairs, 3, k) is the affine form of the unit's input: its k max-pool
        candidates, or k = 1 (see :class:`geomstore.engine.split.Crossings`).
        """
        if self.kind == "maxpool":
            ar = torch.arange(vals.shape[0], device=vals.device)
            return vals[ar, :, states.long()]
        z = vals[:, :, 0]
        on = (states == 1)[:, None]
        if self.kind == "relu":
            return torch.where(on, z, torch.zeros_like(z))
        if self.kind == "abs":
            return torch.where(on, z, -z)
        if self.kind == "leaky":
            return torch.where(on, z, z * float(self.slope))
        if self.kind == "prelu":
            slope = torch.as_tensor(self.slope, dtype=z.dtype, device=z.device).reshape(-1)
            per = self.n_units // slope.numel()
            return torch.where(on, z, z * slope[units // per][:, None])
        const = torch.zeros_like(z)
        const[:, 2] = torch.where(states == 0, z.new_tensor(self.lo), z.new_tensor(self.hi))
        return torch.where(on, z, const)
