"""Geomstore against edge subdivision: one JSON object per MLP (regions, seconds, speedup).

Usage: python benchmarks/edge_subdivision.py [--repeat 3] [--widths 100,100 64,64,64,64]
       [--threads N]

The peer is *edge subdivision* (A. Berzins, "Polyhedral Complex Extraction from ReLU
Networks using Edge Subdivision", ICML 2023; the authors' code is
github.com/arturs-berzins/relu_edge_subdivision), written here from the paper's
algorithm, float64 on the CPU. It keeps the vertices and edges of the complex, starting
from the box. For each neuron in turn (layer by layer, as the authors do) it reads the
neuron's pre-activation at every vertex, splits every edge whose endpoints have opposite
signs at its zero crossing (the neuron is affine along an edge of the current complex,
so linear interpolation is exact) and joins the pairs of new vertices that lie on the
boundary of one face. Faces are found by their sign vectors: the sign vector of a split
edge has one zero (the line it lies on), and setting it to + or - gives the sign vectors
of its two faces; the split edges whose perturbed sign vectors are equal share a face
(a lexicographic sort, as the authors'). Every step is a batched tensor operation over
all vertices or edges; Python loops run only over layers and neurons. The regions are
the bounded faces of the final planar complex, ``E - V + 1`` by Euler's formula.

Where it differs from the authors' code, it saves work and nothing else: sign vectors
are bits in int64 words, not one int8 per column; vertices and edges are appended to
buffers that grow by doubling, not stacked anew for every neuron; a layer's
pre-activations are one matrix product at all vertices when the layer starts and are
interpolated to the vertices it adds (the authors run the whole network on each new
vertex). It does not insert the output's zero level set, which the authors' code adds
as one more neuron (their surfaces are level sets): linear regions are the activation
patterns of the hidden units. On these MLPs it is 4-50 times faster than the authors'
code run in float64 (2-256-256-1: 0.5 s against 12 s, 2-256-256-256-1: 1.3 s against
67 s, on one thread).

For each network (seeded MLPs on [-1, 1]^2, as ``benchmarks/partition.py`` builds them)
it prints the best of ``--repeat`` runs of geomstore's ``partition(model, slice,
device="cpu")`` (after one untimed run, so the lowering cache is warm, as in
``partition.py``) and of edge subdivision on the same weights, both region counts,
``counts_agree``, ``speedup`` (edge subdivision's seconds over geomstore's) and
geomstore's regions per second. Issue #12 asks for a speedup of at least 3; its figures
were taken against the authors' code, which this peer outruns 4-50 times. The two do not
compute the same: geomstore's seconds include every region's polygon, affine map and
pattern, the edges and the decision boundary as tables; the peer's stop at the complex's
vertices and edges (regions counted). Measure on a quiet machine: under load both swing
by 10x, and ``--threads`` changes the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partition import MLPS, mlp, mlp_name, positive_int, widths_arg

from geomstore import Slice, partition

BOX_COLUMNS = 4  # x >= lo, y >= lo, x <= hi, y <= hi: the first columns of a sign vector


def relu_layers(model: nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The float64 (weight, bias) of each hidden layer of a 2-input ReLU MLP.

    The model must alternate ``nn.Linear`` and ``nn.ReLU`` and end with an ``nn.Linear``
    (whose output, with no ReLU after it, makes no region boundary).
    """
    mods = list(model)
    linear = mods[0::2]
    relus = mods[1::2]
    if (
        not linear
        or not all(isinstance(m, nn.Linear) for m in linear)
        or not all(isinstance(m, nn.ReLU) for m in relus)
        or len(linear) != len(relus) + 1
        or linear[0].in_features != 2
    ):
        raise ValueError("expected nn.Sequential(Linear(2, .), ReLU(), ..., Linear(., .))")
    layers = []
    for m in linear[:-1]:
        assert isinstance(m, nn.Linear)
        w = m.weight.detach().to("cpu", torch.float64).contiguous()
        if m.bias is None:
            b = torch.zeros(m.out_features, dtype=torch.float64)
        else:
            b = m.bias.detach().to("cpu", torch.float64).contiguous()
        layers.append((w, b))
    return layers


class Complex:
    """The vertices and edges of the complex, in buffers that grow by doubling.

    ``x`` holds vertex coordinates (``cap x 2``), ``pos`` and ``zero`` a vertex's sign
    vector as bits (``words x cap`` int64: bit ``c`` of ``pos`` is set where column ``c``
    is +, of ``zero`` where it is 0, neither where it is -), ``z`` the current layer's
    pre-activations (``width x cap``, one contiguous row per neuron), ``tail`` and
    ``head`` the edges' vertices. Appending in place, not stacking, keeps a neuron's cost
    proportional to what it changes plus one pass over the vertices and edges.
    """

    def __init__(self, lo: float, hi: float, n_columns: int) -> None:
        words = (n_columns + 63) // 64
        self.nv, self.ne = 4, 4
        self.x = torch.tensor([[lo, lo], [hi, lo], [hi, hi], [lo, hi]], dtype=torch.float64)
        # corners: on x=lo,y=lo / x=hi,y=lo / x=hi,y=hi / x=lo,y=hi (columns 0..3)
        zero_cols = [(0, 1), (2, 1), (2, 3), (0, 3)]
        self.pos = torch.zeros(words, 4, dtype=torch.int64)
        self.zero = torch.zeros(words, 4, dtype=torch.int64)
        for v, cols in enumerate(zero_cols):
            self.zero[0, v] = sum(1 << c for c in cols)
            self.pos[0, v] = sum(1 << c for c in range(BOX_COLUMNS) if c not in cols)
        self.tail = torch.tensor([0, 1, 2, 3])
        self.head = torch.tensor([1, 2, 3, 0])
        self.z = torch.zeros(0, 4, dtype=torch.float64)

    def start_layer(self, w: torch.Tensor, b: torch.Tensor, first: bool) -> None:
        """Evaluate the next layer's pre-activations at every vertex."""
        h = self.x[: self.nv].T if first else self.z[:, : self.nv].clamp(min=0)
        z = torch.addmm(b[:, None], w, h)
        self.z = torch.empty(z.shape[0], self.x.shape[0], dtype=torch.float64)
        self.z[:, : self.nv] = z

    def _reserve(self, nv: int, ne: int) -> None:
        if nv > self.x.shape[0]:
            cap = max(nv, 2 * self.x.shape[0])
            self.x = _grow(self.x, cap, 0)
            self.z = _grow(self.z, cap, 1)
            self.pos = _grow(self.pos, cap, 1)
            self.zero = _grow(self.zero, cap, 1)
        if ne > self.tail.shape[0]:
            cap = max(ne, 2 * self.tail.shape[0])
            self.tail = _grow(self.tail, cap, 0)
            self.head = _grow(self.head, cap, 0)

    def split(self, neuron: int, column: int) -> None:
        """Subdivide the complex by one neuron's zero set (its sign vector column)."""
        nv, ne = self.nv, self.ne
        z = self.z[neuron, :nv]
        tail, head = self.tail[:ne], self.head[:ne]
        above = z > 0
        # opposite signs: one endpoint above, the other below (a vertex at 0 splits nothing)
        idx = (above.index_select(0, tail) != above.index_select(0, head)).nonzero()[:, 0]
        a, b = tail.index_select(0, idx), head.index_select(0, idx)
        za, zb = z.index_select(0, a), z.index_select(0, b)
        if idx.shape[0] and not bool(((za != 0) & (zb != 0)).all()):
            keep = (za != 0) & (zb != 0)
            idx, a, b, za, zb = idx[keep], a[keep], b[keep], za[keep], zb[keep]
        n = idx.shape[0]
        word, bit = divmod(column, 64)
        mask = _bit(bit)
        # old vertices: 0 counts as + (the authors' convention for a vertex on the line)
        self.pos[word, :nv] |= torch.where(z >= 0, mask, 0)
        if n == 0:
            return
        t = za / (za - zb)
        pos = self.pos.index_select(1, a) | self.pos.index_select(1, b)
        zero = self.zero.index_select(1, a) & self.zero.index_select(1, b)
        pos[word] &= ~mask  # the edge's sign vector, before this column existed
        pairs = _shared_faces(pos, zero)
        m = pairs.shape[0]
        self._reserve(nv + n, ne + n + m)
        new = slice(nv, nv + n)
        self.x[new] = torch.lerp(self.x.index_select(0, a), self.x.index_select(0, b), t[:, None])
        self.z[:, new] = torch.lerp(
            self.z.index_select(1, a), self.z.index_select(1, b), t[None, :]
        )
        self.z[neuron, new] = 0.0
        self.pos[:, new] = pos
        zero[word] |= mask
        self.zero[:, new] = zero
        ids = torch.arange(nv, nv + n)
        # a split edge (a, b) becomes (a, new) in place and (b, new) at the end
        self.head[idx] = ids
        self.tail[ne : ne + n] = b
        self.head[ne : ne + n] = ids
        self.tail[ne + n : ne + n + m] = pairs[:, 0] + nv
        self.head[ne + n : ne + n + m] = pairs[:, 1] + nv
        self.nv, self.ne = nv + n, ne + n + m


def _bit(bit: int) -> int:
    """The int64 value of ``1 << bit`` (bit 63 is the sign bit)."""
    return 1 << bit if bit < 63 else -(1 << 63)


def _grow(t: torch.Tensor, cap: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = cap
    out = torch.empty(shape, dtype=t.dtype)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def _shared_faces(pos: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Pairs of split edges (indices into them) that lie on the boundary of one face.

    ``pos`` and ``zero`` are the split edges' sign vectors as bits (``words x n``). An
    edge lies on one line (its zero column); its two faces have that column - or +, the
    rest as the edge. Equal face sign vectors (all entries nonzero, so the + bits say it
    all) come from the two edges where the new line enters and leaves a face; they are
    adjacent after a lexicographic sort.
    """
    n = pos.shape[1]
    faces = torch.cat([pos, pos | zero], dim=1)  # words x 2n: face below, face above
    if faces.shape[0] == 1:
        order = torch.sort(faces[0], stable=True).indices
    else:
        order = torch.from_numpy(np.lexsort(faces.flip(0).numpy()))
    keys = faces[:, order]
    same = (keys[:, 1:] == keys[:, :-1]).all(dim=0).nonzero()[:, 0]
    return torch.stack([order[same], order[same + 1]], dim=1) % n


def subdivide(model: nn.Sequential, lo: float = -1.0, hi: float = 1.0) -> Complex:
    """The polyhedral complex of a 2-input ReLU MLP on ``[lo, hi]^2``, by edge subdivision."""
    layers = relu_layers(model)
    cx = Complex(lo, hi, BOX_COLUMNS + sum(w.shape[0] for w, _ in layers))
    column = BOX_COLUMNS
    with torch.no_grad():
        for i, (w, b) in enumerate(layers):
            cx.start_layer(w, b, first=i == 0)
            for k in range(w.shape[0]):
                cx.split(k, column)
                column += 1
    return cx


def count_regions(model: nn.Sequential, lo: float = -1.0, hi: float = 1.0) -> int:
    """The number of linear regions of ``model`` on ``[lo, hi]^2`` by edge subdivision.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 0.0]])), net[0].bias.zero_()
    >>> count_regions(net)
    2
    """
    cx = subdivide(model, lo, hi)
    return cx.ne - cx.nv + 1  # Euler: V - E + F = 2, less the outer face


def face_sign_vectors(cx: Complex) -> torch.Tensor:
    """The distinct sign vectors (+ bits, ``faces x words``) of the complex's faces.

    Each edge gives the sign vectors of its two faces; those outside the box (a box
    column -) are dropped. Counting them checks Euler's count without trusting the edges'
    topology.
    """
    tail, head = cx.tail[: cx.ne], cx.head[: cx.ne]
    pos = cx.pos[:, tail] | cx.pos[:, head]
    zero = cx.zero[:, tail] & cx.zero[:, head]
    faces = torch.cat([pos, pos | zero], dim=1)
    box = (1 << BOX_COLUMNS) - 1
    inside = (faces[0] & box) == box
    return torch.unique(faces[:, inside].T, dim=0)


def _best(fn: object, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t)
    return best, out


def run(widths: tuple[int, ...], repeat: int) -> dict[str, object]:
    model = mlp(widths)
    box = Slice.box((-1, -1), (1, 1))
    partition(model, box, device="cpu")  # untimed: traces the model into the cache
    gs_s, part = _best(lambda: partition(model, box, device="cpu"), repeat)
    es_s, es_regions = _best(lambda: count_regions(model, -1.0, 1.0), repeat)
    regions = part.n_regions  # type: ignore[attr-defined]
    return {
        "network": mlp_name(widths),
        "regions": regions,
        "es_regions": es_regions,
        "counts_agree": regions == es_regions,
        "geomstore_seconds": round(gs_s, 4),
        "es_seconds": round(es_s, 4),
        "speedup": round(es_s / gs_s, 2),
        "regions_per_second": round(regions / gs_s),
        "threads": torch.get_num_threads(),
        # not the same output: the peer stops at the complex's vertices and edges
        "geomstore_computes": "region polygons, affine maps, patterns, edges, boundary",
        "es_computes": "vertices and edges; regions counted by Euler's formula",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=positive_int, default=3, help="timed runs per method (best)")
    ap.add_argument(
        "--widths",
        type=widths_arg,
        nargs="+",
        metavar="W,W,...",
        help="hidden widths of the MLPs instead of partition.py's (e.g. 100,100 64,64,64,64)",
    )
    ap.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads for both methods (default: torch's own, as partition.py)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for widths in args.widths or MLPS:
        res = run(widths, args.repeat)
        print(f"{res['network']}: speedup {res['speedup']}", file=sys.stderr, flush=True)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
