"""The depth-first, memory-bounded descent through a program's nonlinearities.

Cells (regions of the partition by the first ``i`` nonlinearities) are processed in
chunks; each chunk gets the affine form of nonlinearity ``i``'s input, is split by that
nonlinearity's units, and its children descend to ``i + 1`` in chunks of their own.
Memory is bounded by depth x chunk, not by the number of regions.

Affine forms are (cells, 3, N): the two slopes in slice coordinates and the value at the
slice centre. A child of a split differs from its cell only in the few units whose line
crossed the cell (1-2 on average in the benchmark MLPs), so where the stage after a
nonlinearity is a function of its output alone, the next input of a child is the cell's
*base* (every crossing unit in state 0, computed once per cell) plus one rank-1 term per
changed unit (a column of the stage's matrix). This replaces a dense matmul per child by
a few outer products. Other stages (residual connections, stages reading earlier values)
run the program's own nodes on three points of each child.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from geomstore.engine.graph import Program
from geomstore.engine.host import to_host
from geomstore.engine.patterns import PatternHash, pack_states
from geomstore.engine.split import Crossings, CutLog, Polys, crossings, pad_polys, split_layer
from geomstore.errors import MemoryBudgetError
from geomstore.slice import Slice

__all__ = ["Descent", "Progress", "RawRegions"]


@dataclass
class RawRegions:
    """Final regions, in centred slice coordinates, gathered from all chunks.

    Everything but the patterns stays on the compute device, where the tables are built
    (a GPU keeps its regions until one copy of the finished columns). Whole patterns are
    packed and hashed chunk by chunk as they finish (:func:`pack_states`), so a region
    keeps ``ceil(bits / 8)`` bytes instead of a byte per unit, and the packed chunks, the
    bulk of a large partition's output, go to the host as they finish (the device holds
    one chunk's). Copying them in a thread beside the descent measured no faster on an
    H100 (2-2048-2048-1: 2.51 s without, 2.68 s with).
    """

    layout: list[tuple[int, int, int]]  # (unit_offset, n_units, bits) of each nonlinearity
    hasher: PatternHash | None = None  # None: the descent carries the hashes (large models)
    packed: list[np.ndarray] = field(default_factory=list)  # (Q, bytes) per chunk, on the host
    verts: list[Tensor] = field(default_factory=list)
    n: list[Tensor] = field(default_factory=list)
    side: list[Tensor] = field(default_factory=list)
    hashes: list[Tensor] = field(default_factory=list)  # (Q, 2) int64 pattern hashes
    values: list[Tensor] = field(default_factory=list)  # (Q, 3, K) affine form of the outputs

    def add(self, polys: Polys, states: Tensor, values: Tensor, hist: Tensor | None) -> None:
        self.verts.append(polys.verts)
        self.n.append(polys.n)
        self.side.append(polys.side)
        if hist is None:
            assert self.hasher is not None
            self.packed.append(to_host(pack_states(states, self.layout)))
            self.hashes.append(self.hasher.of(states))
        else:
            self.hashes.append(hist)
        self.values.append(values)

    def concat(self) -> dict[str, Any]:
        """One tensor per field, on the compute device (sides padded with -2**62), but
        ``packed``: a list of host arrays, one per chunk, or None (hashes only)."""
        width = max(int(v.shape[1]) for v in self.verts)
        # new slots repeat vertex 0, as in every padded polygon: the boundary's clips
        # read the closing side from slot n (zeros there put a phantom corner at the
        # slice's centre, and the decision boundary of a many-chunk partition went wrong)
        padded = [pad_polys(v, s, width) for v, s in zip(self.verts, self.side, strict=True)]
        return {
            "verts": torch.cat([v for v, _ in padded]),
            "n": torch.cat(self.n),
            "side": torch.cat([s for _, s in padded]),
            "packed": self.packed if self.hasher is not None else None,
            "hashes": torch.cat(self.hashes),
            "values": torch.cat(self.values),
        }


@dataclass(frozen=True)
class Progress:
    """Where a running partition stands, passed to ``partition(..., progress=)``.

    ``regions`` finished so far; ``pending[i]`` cells waiting at depth ``i`` (cells of
    the partition by the first ``i`` nonlinearities, not yet split by the next);
    ``elapsed`` seconds since the descent started.
    """

    regions: int
    pending: tuple[int, ...]
    elapsed: float


@dataclass
class _Matrix:
    """The stage after a nonlinearity as a matrix: next input = output @ jt + bias."""

    jt: Tensor  # (units, n_next)
    bias: Tensor  # (n_next,)
    dense: bool  # True: the stage is matrix products only, so bases use jt too


@dataclass
class _Cells:
    """What the children of one split read from their cells."""

    cross: Crossings  # the crossing (cell, unit) pairs and their input values
    base_states: Tensor  # (cells, units): crossing units in state 0
    base: Tensor | None  # (cells, 3, n_next) next input at the base states (matrix stages)
    coef: Tensor | None  # (cells, 3, N_in) the whole input form, where children need it


_MATMUL_ONLY = {
    "linear",
    "addmm",
    "mm",
    "t",
    "view",
    "reshape",
    "_unsafe_view",
    "flatten",
    "getitem",
    "dropout",
    "identity",
    "contiguous",
    "clone",
    "alias",
    "detach",
}


class Descent:
    """Compute the raw partition of ``slice`` by ``program``.

    Parameters
    ----------
    tol : float
        Vertices closer than ``tol * diameter`` to a unit's zero line are taken to lie on it.
    chunk_elements : int, optional
        Float64 elements of every depth's chunk, fixed; by default derived from
        ``memory`` depth by depth (see ``_share``).
    """

    max_matrix_elements = 1 << 23
    block_elements = 1 << 22  # float64 elements of one block's input forms on a CPU (32 MiB)
    # on a GPU: blocks as large as the depth's chunk allows (each block costs kernel
    # launches); at 1 << 27, LeNet-5's max-pool depths took five blocks each under an
    # H100's budget and dispatched 6,019 operations, 4,690 now (VGG-11 8,078 -> 7,421)
    device_block_elements = 1 << 30
    rank1_limit = 1  # rank-1 updates while changed units per child <= units / 32 x this
    # deep depths take what shallow ones leave, and stages that run the program's nodes
    # take their cells in blocks (None: on GPUs, where each batch costs kernel launches)
    grow_shares: bool | None = None

    def __init__(
        self,
        program: Program,
        slice_: Slice,
        *,
        tol: float,
        chunk_elements: int | None = None,
        memory: int = 4 << 30,
        progress: Any = None,
        hash_patterns: bool = False,
    ) -> None:
        self.program = program
        self.slice = slice_
        self.dev = program.device
        self.centre = slice_.domain.mean(axis=0)
        self.h = slice_.diameter / 2.0
        self.tol = tol * slice_.diameter
        self.n_layers = len(program.nonlinearities)
        # every depth of the descent holds one chunk (and its temporaries) at a time
        self.levels_factor = 3 * (self.n_layers + 1)
        self.memory = memory
        self.elements = memory // 8  # float64 elements the depths hold together
        self.level_min = self.elements // (self.n_layers + 1)  # kept for each depth
        self.chunk_elements = chunk_elements
        if self.dev.type != "cpu":
            self.block_elements = self.device_block_elements
        # growing shares, and stages run on the program's nodes in blocks (GPUs)
        self.grow = self.grow_shares if self.grow_shares is not None else self.dev.type != "cpu"
        self.cuts = CutLog()
        self.progress = progress
        # large models: carry each region's pattern hash and only the last layer's states
        self.hasher = PatternHash(program.n_units, self.dev) if hash_patterns else None
        layout = [(s.unit_offset, s.n_units, s.bits) for s in program.nonlinearities]
        self.out = RawRegions(
            layout, None if hash_patterns else PatternHash(program.n_units, self.dev)
        )
        self.pending = [0] * (self.n_layers + 1)  # cells waiting at each depth (progress)
        self.done = 0
        self.t0 = time.perf_counter()
        with torch.no_grad():
            self.matrices = [
                program.memo(
                    ("stage matrix", i, self.max_matrix_elements),
                    lambda i=i: self._stage_matrix(i),
                )
                for i in range(self.n_layers)
            ]

    # helpers ---------------------------------------------------------------------------------
    def _points_input(self) -> Tensor:
        pts = self.centre[None, :] + np.array([[0.0, 0.0], [self.h, 0.0], [0.0, self.h]])
        x = self.slice.lift(pts, shaped=True)
        return torch.as_tensor(x, dtype=torch.float64, device=self.dev)

    def _coef(self, pre: Tensor, p: int) -> Tensor:
        """(P*3, *shape) values at the 3 points -> (P, 3, N): slope0, slope1, value at centre."""
        v = pre.reshape(p, 3, -1)
        v0 = v[:, :1]
        return torch.cat([(v[:, 1:] - v0) / self.h, v0], 1)

    def _points(self, coef: Tensor) -> Tensor:
        """The inverse of :meth:`_coef`: (P, 3, N) affine form -> values at the 3 points."""
        c = coef[:, 2]
        return torch.stack([c, c + self.h * coef[:, 0], c + self.h * coef[:, 1]], 1)

    @staticmethod
    def _gather(t: Any, par: Tensor) -> Any:
        if not isinstance(t, Tensor):
            return t
        # rows come in threes (the three points of a cell)
        return t.reshape(-1, 3, *t.shape[1:]).index_select(0, par).view(-1, *t.shape[1:])

    def _target(self, layer: int, env: dict[Any, Any]) -> Tensor:
        """The tensor stage ``layer`` computes: nonlinearity ``layer``'s input or the output."""
        prog = self.program
        if layer < self.n_layers:
            return env[prog.nonlinearities[layer].node.args[0]]
        res = prog._fetch(prog.output_node().args[0], env)
        return res[0] if isinstance(res, (tuple, list)) else res

    def _run_stage(self, layer: int, env: dict[Any, Any], out: Tensor) -> Tensor:
        """Run stage ``layer`` (after nonlinearity ``layer - 1``, whose output is ``out``)."""
        prog = self.program
        prev = prog.nonlinearities[layer - 1]
        env[prev.node] = out
        env.update(prog.static)
        for node in prog.stage_nodes(layer):
            if node not in env:
                env[node] = prog.run_node(node, env)
        return self._target(layer, env)

    def _stage_matrix(self, layer: int) -> _Matrix | None:
        """Stage ``layer + 1`` as a matrix when it reads nothing but nonlinearity ``layer``."""
        prog = self.program
        spec = prog.nonlinearities[layer]
        if any(n is not spec.node and n not in prog.static for n in prog.live_after(layer)):
            return None
        if layer + 1 < self.n_layers:
            nxt = prog.nonlinearities[layer + 1]
            if any(n is not nxt.node and n not in prog.static for n in prog.live_after(layer + 1)):
                return None
        units = spec.n_units
        n_next = (
            int(np.prod(prog.nonlinearities[layer + 1].in_shape))
            if layer + 1 < self.n_layers
            else prog.n_outputs
        )
        # decide by size before probing: a conv layer's eye(units) alone can be gigabytes
        if (
            units * n_next > self.max_matrix_elements
            or units * units > 4 * self.max_matrix_elements
        ):
            return None
        x = torch.zeros((units + 1, units), dtype=torch.float64, device=self.dev)
        x[1:].fill_diagonal_(1.0)  # the origin, then each unit vector
        try:
            res = self._run_stage(layer + 1, {}, x.reshape(units + 1, *spec.out_shape))
        except Exception:  # a stage that cannot take this batch keeps the general path
            return None
        res = res.reshape(units + 1, -1)
        if units * res.shape[1] > self.max_matrix_elements:
            return None
        dense = all(
            self._matmul_only(n) for n in prog.stage_nodes(layer + 1) if n not in prog.static
        )
        return _Matrix(jt=res[1:] - res[:1], bias=res[0], dense=dense)

    @staticmethod
    def _matmul_only(node: Any) -> bool:
        name = str(getattr(node.target, "__name__", node.target))
        return name.replace("aten.", "").split(".")[0] in _MATMUL_ONLY

    def _base(self, layer: int, coef: Tensor, base_states: Tensor) -> Tensor:
        """Stage ``layer + 1``'s output on each cell with its base states, affine form."""
        spec = self.program.nonlinearities[layer]
        m = self.matrices[layer]
        assert m is not None
        p = coef.shape[0]
        if m.dense:
            out = spec.apply(coef, base_states, coef=True).reshape(p * 3, -1)
            base = (out @ m.jt).reshape(p, 3, -1)
            base.select(1, 2).add_(m.bias)
            return base
        out = spec.apply(self._points(coef), base_states).reshape(-1, *spec.out_shape)
        return self._coef(self._run_stage(layer + 1, {}, out), p)

    def _child_coef(self, layer: int, cells: _Cells, par: Tensor, states: Tensor) -> Tensor:
        """Children's next input: the cell's base plus a rank-1 term per changed unit."""
        spec = self.program.nonlinearities[layer]
        m = self.matrices[layer]
        assert m is not None and cells.base is not None
        base_states = cells.base_states.index_select(0, par)
        q_idx, u_idx = torch.nonzero(states != base_states, as_tuple=True)
        many = q_idx.numel() > par.numel() * max(1, spec.n_units // 32) * self.rank1_limit
        if cells.coef is not None and many:
            # many changed units per child (the first layer): a dense product is cheaper
            return self._base(layer, cells.coef.index_select(0, par), states)
        coef = cells.base.index_select(0, par)
        if q_idx.numel():
            k = cells.cross.find(par[q_idx], u_idx, spec.n_units)
            vals = cells.cross.vals[k]
            d = spec.unit_change(vals, u_idx, states[q_idx, u_idx], base_states[q_idx, u_idx])
            _index_add(coef, q_idx, d[:, :, None] * m.jt[u_idx][:, None, :])
        return coef

    def _dense_input(self, layer: int) -> bool:
        """Whether stage ``layer`` runs the program's nodes (no matrix form for it)."""
        return layer == 0 or self.matrices[layer - 1] is None

    def _share(self, layer: int, avail: int) -> int:
        """Float64 elements one cell's share times the batch may hold at depth ``layer``,
        where the depths above it left ``avail`` of the budget's elements.

        A batch needs three times its elements while it computes (temporaries) and holds
        them once while its children descend. Each depth keeps ``level_min`` (an even
        split) for every depth below it and may take the rest: by induction every depth
        gets at least its even split, and the deep depths, where the cells are, take what
        the shallow ones, holding few cells, leave. On a GPU, where each batch costs
        kernel launches, ResNet-20 (5,245 regions) went from 216 batches to 64 and from
        104k operations to 55k. A CPU keeps the even split: LeNet-5's larger batches
        left the cache and took 15-20% longer there.
        """
        if self.chunk_elements:
            return self.chunk_elements
        if not self.grow:  # cache-sized work wins on a CPU: the even split
            return max(1 << 12, self.level_min // 3)
        reserve = (self.n_layers - layer) * self.level_min
        return max(1 << 12, (avail - reserve) // 3)

    def _sizes(
        self, layer: int, live: dict[Any, Any], width: int, chunk: int
    ) -> tuple[int, int, int]:
        """Cells per split batch and per block of input forms within ``chunk`` elements,
        and the elements one cell of the batch holds.

        A batch holds polygons, states and what its children read (bases, or whole input
        forms); input forms are computed a block at a time, small enough to stay in cache.
        A stage that runs the program's nodes takes the whole batch at once on a CPU (its
        temporaries count per cell); with growing shares it runs in blocks too, so that
        its temporaries no longer bound the batch (LeNet-5 with the GPU's settings: its
        max-pool depth went from two batches to one, 10,137 operations to 7,860).
        """
        prog = self.program
        carried = (
            prog.n_units
            if self.hasher is None
            else max((s.n_units for s in prog.nonlinearities), default=0)
        )
        per = 12 * width + carried // 4 + 1
        per += sum(t[0].numel() * 3 for t in live.values() if isinstance(t, Tensor))
        block_per = 1
        if layer < self.n_layers:
            spec = prog.nonlinearities[layer]
            n_in = int(np.prod(spec.in_shape))
            k = 1 if spec.candidates is None else int(spec.candidates.shape[1])
            block_per = 8 * n_in + (width * spec.n_units * k if k > 1 else 0)
            m = self.matrices[layer]
            per += 3 * n_in if m is None else 3 * int(m.jt.shape[1])
        if layer > 0:
            prev = prog.nonlinearities[layer - 1]
            block_per += 6 * int(np.prod(prev.in_shape))
        dense = self._dense_input(layer)
        whole = dense and not self.grow  # the stage runs on the batch
        if whole:
            per += block_per
        if per > chunk:
            raise self._too_big(layer, live, per)
        batch = max(1, chunk // per)
        if whole:
            block = batch
        elif dense:  # its temporaries also within the depth's chunk
            block = max(1, min(self.block_elements, chunk) // block_per)
        else:
            block = max(1, self.block_elements // block_per)
        return batch, min(batch, block), per

    def _too_big(self, layer: int, live: dict[Any, Any], per: int) -> MemoryBudgetError:
        """The error for a cell that does not fit: the budget and the widest tensor."""
        prog = self.program
        sizes = {
            f"{getattr(n, 'name', n)} {tuple(t.shape[1:])}": t[0].numel()
            for n, t in live.items()
            if isinstance(t, Tensor)
        }
        if layer < self.n_layers:
            spec = prog.nonlinearities[layer]
            sizes[f"the input of {spec.name} {spec.in_shape}"] = int(np.prod(spec.in_shape))
        widest = max(sizes, key=lambda k: sizes[k]) if sizes else "the polygons"
        if self.chunk_elements:  # the caller's chunk, not the budget, is what is short
            return MemoryBudgetError(
                f"one cell at depth {layer} holds about {per:,} float64 elements (its widest "
                f"tensor: {widest}), more than chunk_elements={self.chunk_elements:,}; raise "
                "chunk_elements=, or leave it out to size the chunks from memory=."
            )
        need = per * 8 * self.levels_factor
        return MemoryBudgetError(
            f"one cell at depth {layer} needs about {need / 2**20:.0f} MiB (its widest tensor: "
            f"{widest}), more than the memory budget of {self.memory / 2**20:.0f} MiB allows; "
            "raise memory= (for example memory='16GiB'), or partition a smaller model."
        )

    def _input_coef(
        self,
        layer: int,
        env: dict[Any, Any],
        parents: _Cells | None,
        par: Tensor,
        states: Tensor,
    ) -> Tensor:
        """Affine form (cells, 3, N) of stage ``layer``'s result for cells of parents ``par``."""
        prog = self.program
        p = int(par.shape[0])
        if layer == 0:
            env.update(prog.static)
            for node in prog.stage_nodes(0):
                if node not in env:
                    env[node] = prog.run_node(node, env)
            return self._coef(self._target(0, env), p)
        prev = prog.nonlinearities[layer - 1]
        assert parents is not None
        lstates = (
            states
            if self.hasher is not None
            else states[:, prev.unit_offset : prev.unit_offset + prev.n_units]
        )
        if self.matrices[layer - 1] is not None:
            return self._child_coef(layer - 1, parents, par, lstates)
        assert parents.coef is not None
        pre_prev = self._points(parents.coef.index_select(0, par))
        out = prev.apply(pre_prev.reshape(p, 3, *prev.in_shape), lstates)
        return self._coef(self._run_stage(layer, env, out.reshape(-1, *prev.out_shape)), p)

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
        hist = (
            None if self.hasher is None else torch.zeros((1, 2), dtype=torch.int64, device=self.dev)
        )
        with torch.no_grad():
            self._descend(0, cells, states, env, None, hist, self.elements)
        return self.out

    def _report(self, finished: int) -> None:
        self.done += finished
        if self.progress is not None:
            self.progress(Progress(self.done, tuple(self.pending), time.perf_counter() - self.t0))

    def _descend(
        self,
        layer: int,
        polys: Polys,
        states: Tensor,
        penv: dict[Any, Any],
        parents: _Cells | None,
        hist: Tensor | None,
        avail: int,
    ) -> None:
        prog = self.program
        q = len(polys)
        chunk = self._share(layer, avail)
        batch, block, per = self._sizes(layer, penv, int(polys.verts.shape[1]), chunk)
        # equal chunks: a full chunk and a remainder of a few cells would give the few a
        # line of small chunks (small batches) down to the last depth
        batch = -(-q // -(-q // batch))
        block = min(block, batch)
        for lo in range(0, q, batch):
            idx = torch.arange(lo, min(q, lo + batch), device=self.dev)
            sub = polys.take(idx) if (lo > 0 or lo + batch < q) else polys
            sub_states = states[idx] if sub is not polys else states
            sub_hist = None if hist is None else hist[idx.to(hist.device)]
            self.pending[layer] = q - lo - len(sub)
            par = sub.parent
            p = len(sub)
            env = {node: self._gather(t, par) for node, t in penv.items()}
            if layer == self.n_layers:
                values = [
                    self._input_coef(
                        layer,
                        _rows(env, b, b + block, p),
                        parents,
                        par[b : b + block],
                        sub_states[b : b + block],
                    )
                    for b in range(0, p, block)
                ]
                self.out.add(sub, sub_states, torch.cat(values), sub_hist)
                self._report(p)
                continue
            spec = prog.nonlinearities[layer]
            m = self.matrices[layer]
            keep_coef = m is None or p == 1 or self.rank1_limit == 0
            keep = (
                set(prog.live_after(layer)) - {spec.node} - set(prog.static) if m is None else set()
            )
            kept: dict[Any, list[Any]] = {}  # what the children read, block by block
            st0s: list[Tensor] = []
            crosses: list[tuple[int, Crossings]] = []
            bases: list[Tensor] = []
            coefs: list[Tensor] = []
            for b in range(0, p, block):
                e = min(p, b + block)
                benv = _rows(env, b, e, p)
                coef = self._input_coef(layer, benv, parents, par[b:e], sub_states[b:e])
                for n in keep:
                    if n in benv and n not in env:  # computed by this block's stage
                        kept.setdefault(n, []).append(benv[n])
                del benv
                st0, cr = crossings(spec, coef, sub.verts[b:e], sub.n[b:e], self.tol)
                st0s.append(st0)
                crosses.append((b, cr))
                if m is not None:
                    bases.append(self._base(layer, coef, st0))
                if keep_coef:
                    coefs.append(coef)
            state0 = torch.cat(st0s)
            cross = Crossings.concat(crosses)
            cells = Polys(sub.verts, sub.n.clone(), sub.side, torch.arange(p, device=self.dev))
            children, lstates = split_layer(spec, cells, state0, cross, self.tol, self.cuts)
            child_hist = None
            if self.hasher is not None and sub_hist is not None:
                child_hist = sub_hist[children.parent.to(sub_hist.device)] + self.hasher.of(
                    lstates, spec.unit_offset
                ).to(sub_hist.device)
                child_states = lstates
            else:
                child_states = torch.cat([sub_states[children.parent], lstates], dim=1)
            live = {n: t for n, t in env.items() if n in keep}
            for n, parts in kept.items():
                live[n] = torch.cat(parts) if isinstance(parts[0], Tensor) else parts[0]
            base = torch.cat(bases) if bases else None
            whole = torch.cat(coefs) if coefs else None
            del bases, coefs
            cells_info = _Cells(cross, state0, base, whole)
            left = max(0, avail - p * per)  # what this batch holds while its children run
            # temporaries (the blocks' parts of ``live`` among them), not held below
            del env, cells, lstates, st0s, crosses, coef, st0, cr, kept
            self._descend(layer + 1, children, child_states, live, cells_info, child_hist, left)
        self.pending[layer] = 0


def _rows(env: dict[Any, Any], lo: int, hi: int, p: int) -> dict[Any, Any]:
    """``env`` for cells ``lo:hi`` of its ``p`` (rows come in threes); itself when whole."""
    if lo == 0 and hi >= p:
        return env
    return {n: t[3 * lo : 3 * hi] if isinstance(t, Tensor) else t for n, t in env.items()}


def _index_add(out: Tensor, index: Tensor, values: Tensor) -> None:
    """``out.index_add_(0, index, values)``, bit-for-bit the same on every run.

    CUDA's ``index_add_`` adds with atomics, so rows that receive several terms sum them
    in a different order on each run (the last bits of the affine maps moved between two
    runs on an H200). ``index_put_`` with ``accumulate`` sorts the terms by row and adds
    each row's in their order on CUDA: what ``index_add_`` itself does under
    ``torch.use_deterministic_algorithms``, without setting that process-wide flag (which
    would make other threads' nondeterministic operations raise meanwhile).
    """
    if out.device.type == "cuda":
        out.index_put_((index,), values, accumulate=True)
    else:
        out.index_add_(0, index, values)
