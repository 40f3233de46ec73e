"""The depth-first, memory-bounded descent through a program's nonlinearities.

Cells (regions of the partition by the first ``i`` nonlinearities) are processed in
chunks; each chunk runs the affine stage before nonlinearity ``i`` in the 3-point
representation, is split by that nonlinearity's units, and its children descend to
``i + 1`` in chunks of their own. Memory is bounded by depth x chunk, not by the number
of regions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from geomstore.engine.graph import Program
from geomstore.engine.split import CutLog, Polys, split_layer
from geomstore.slice import Slice

__all__ = ["Descent", "RawRegions"]


@dataclass
class RawRegions:
    """Final regions, in centred slice coordinates, gathered from all chunks."""

    verts: list[Tensor] = field(default_factory=list)
    n: list[Tensor] = field(default_factory=list)
    side: list[Tensor] = field(default_factory=list)
    states: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)  # (Q, 3, K) outputs at the 3 points

    def add(self, polys: Polys, states: Tensor, values: Tensor) -> None:
        self.verts.append(polys.verts.cpu())
        self.n.append(polys.n.cpu())
        self.side.append(polys.side.cpu())
        self.states.append(states.cpu())
        self.values.append(values.cpu())

    def concat(self) -> dict[str, np.ndarray]:
        width = max(int(v.shape[1]) for v in self.verts)
        pad_v = [torch.nn.functional.pad(v, (0, 0, 0, width - v.shape[1])) for v in self.verts]
        pad_s = [
            torch.nn.functional.pad(s, (0, width - s.shape[1]), value=-(1 << 62)) for s in self.side
        ]
        return {
            "verts": torch.cat(pad_v).numpy(),
            "n": torch.cat(self.n).numpy(),
            "side": torch.cat(pad_s).numpy(),
            "states": torch.cat(self.states).numpy(),
            "values": torch.cat(self.values).numpy(),
        }


class Descent:
    """Compute the raw partition of ``slice`` by ``program``.

    Parameters
    ----------
    tol : float
        Vertices closer than ``tol * diameter`` to a unit's zero line are taken to lie on it.
    chunk_elements : int
        Float64 elements a chunk's largest working tensor may hold (memory bound).
    """

    def __init__(
        self,
        program: Program,
        slice_: Slice,
        *,
        tol: float,
        chunk_elements: int,
        progress: Any = None,
    ) -> None:
        self.program = program
        self.slice = slice_
        self.dev = program.device
        self.centre = slice_.domain.mean(axis=0)
        self.h = slice_.diameter / 2.0
        self.tol = tol * slice_.diameter
        self.chunk_elements = chunk_elements
        self.cuts = CutLog()
        self.out = RawRegions()
        self.progress = progress
        self.n_layers = len(program.nonlinearities)

    # helpers ---------------------------------------------------------------------------------
    def _points_input(self) -> Tensor:
        pts = self.centre[None, :] + np.array([[0.0, 0.0], [self.h, 0.0], [0.0, self.h]])
        x = self.slice.lift(pts, shaped=True)
        return torch.as_tensor(x, dtype=torch.float64, device=self.dev)

    def _coef(self, pre: Tensor, p: int) -> Tensor:
        """(P*3, *shape) values at the 3 points -> (P, 3, N): slope0, slope1, value at centre."""
        v = pre.reshape(p, 3, -1)
        return torch.stack([(v[:, 1] - v[:, 0]) / self.h, (v[:, 2] - v[:, 0]) / self.h, v[:, 0]], 1)

    @staticmethod
    def _gather(t: Any, par: Tensor) -> Any:
        if not isinstance(t, Tensor):
            return t
        rows = (par[:, None] * 3 + torch.arange(3, device=par.device)[None, :]).reshape(-1)
        return t.index_select(0, rows)

    def _per_cell_elements(self, layer: int, live: dict[Any, Any], width: int) -> int:
        per = 0
        for t in live.values():
            if isinstance(t, Tensor):
                per += t[0].numel() * 3
        if layer < self.n_layers:
            spec = self.program.nonlinearities[layer]
            n_in = int(np.prod(spec.in_shape))
            k = 1 if spec.candidates is None else int(spec.candidates.shape[1])
            per += 3 * n_in + width * max(n_in, spec.n_units * k)
        if layer > 0:
            spec = self.program.nonlinearities[layer - 1]
            per += 6 * int(np.prod(spec.in_shape))
        return max(per, 1)

    # the descent -----------------------------------------------------------------------------
    def run(self) -> RawRegions:
        dom = torch.as_tensor(self.slice.domain - self.centre, device=self.dev)
        k = dom.shape[0]
        cells = Polys(
            dom[None].clone(),
            torch.tensor([k], device=self.dev),
            -(1 + torch.arange(k, device=self.dev))[None, :],
            torch.zeros(1, dtype=torch.long, device=self.dev),
        )
        placeholder = next(n for n in self.program.nodes if n.op == "placeholder")
        env = {placeholder: self._points_input()}
        states = torch.zeros((1, 0), dtype=torch.uint8, device=self.dev)
        with torch.no_grad():
            self._descend(0, cells, states, env, None)
        return self.out

    def _descend(
        self, layer: int, polys: Polys, states: Tensor, penv: dict[Any, Any], ppre: Tensor | None
    ) -> None:
        prog = self.program
        q = len(polys)
        per = self._per_cell_elements(layer, penv, int(polys.verts.shape[1]))
        chunk = max(1, self.chunk_elements // per)
        for lo in range(0, q, chunk):
            idx = torch.arange(lo, min(q, lo + chunk), device=self.dev)
            sub = polys.take(idx) if (lo > 0 or lo + chunk < q) else polys
            sub_states = states[idx] if sub is not polys else states
            par = sub.parent
            env = {node: self._gather(t, par) for node, t in penv.items()}
            env.update(prog.static)
            if layer > 0:
                prev = prog.nonlinearities[layer - 1]
                assert ppre is not None
                pre_prev = ppre.reshape(-1, 3, *prev.in_shape).index_select(0, par)
                lstates = sub_states[:, prev.unit_offset : prev.unit_offset + prev.n_units]
                out = prev.apply(pre_prev, lstates).reshape(-1, *prev.out_shape)
                is_tuple = "with_indices" in str(prev.node.target) or prev.pool.get(
                    "return_indices", False
                )
                env[prev.node] = (out, None) if is_tuple else out
            for node in prog.stage_nodes(layer):
                if node not in env:
                    env[node] = prog.run_node(node, env)
            p = len(sub)
            if layer == self.n_layers:
                res = prog._fetch(prog.output_node().args[0], env)
                if isinstance(res, (tuple, list)):
                    res = res[0]
                self.out.add(sub, sub_states, res.reshape(p, 3, -1))
                if self.progress is not None:
                    self.progress(p)
                continue
            spec = prog.nonlinearities[layer]
            pre = env[spec.node.args[0]]
            coef = self._coef(pre, p)
            cells = Polys(sub.verts, sub.n.clone(), sub.side, torch.arange(p, device=self.dev))
            children, lstates = split_layer(spec, coef, cells, self.tol, self.cuts)
            child_states = torch.cat([sub_states[children.parent], lstates], dim=1)
            keep = set(prog.live_after(layer)) - {spec.node}
            live = {n: t for n, t in env.items() if n in keep and n not in prog.static}
            self._descend(layer + 1, children, child_states, live, pre)
