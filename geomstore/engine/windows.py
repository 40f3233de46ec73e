"""Max-like operators as units: the input elements each output element is the max of.

Every max-like operator (max pooling of any dimension, adaptive or with ``ceil_mode``,
max / amax over dimensions) is one unit per output element whose value is the maximum of
a fixed set of input elements, its *candidates*. :func:`reduce_candidates`,
:func:`pool_candidates` and :func:`adaptive_candidates` give those sets as a
``(units, k)`` tensor of flat indices into one sample's input (C order). Windows with
fewer than ``k`` elements are padded with their first index: duplicates tie and never
win, so the first maximum stays the winner.

Examples
--------
>>> reduce_candidates((2, 3), dims=(1,)).tolist()
[[0, 1, 2], [3, 4, 5]]
>>> pool_candidates((1, 1, 4), kernel=(2,), stride=(2,), padding=(0,), dilation=(1,),
...                 ceil_mode=False).tolist()
[[0, 1], [2, 3]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adaptive_candidates", "pool_candidates", "reduce_candidates", "windows_max"]


def _numbered(shape: Sequence[int]) -> Tensor:
    n = math.prod(shape)
    return torch.arange(n, dtype=torch.long).reshape(tuple(shape))


def _pad_first(cand: Tensor) -> Tensor:
    """Replace -1 entries by the row's first valid index."""
    valid = cand >= 0
    first = cand.masked_fill(~valid, 1 << 60).min(dim=1, keepdim=True).values
    return torch.where(valid, cand, first.expand_as(cand))


def reduce_candidates(shape: Sequence[int], dims: Sequence[int]) -> Tensor:
    """Candidates of a max over ``dims`` of one sample of shape ``shape`` (output C order)."""
    dims = sorted({d % len(shape) for d in dims})
    keep = [d for d in range(len(shape)) if d not in dims]
    idx = _numbered(shape).permute(*keep, *dims)
    k = math.prod(shape[d] for d in dims)
    return idx.reshape(-1, k)


def _out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (a last window must start inside the input or pad)."""
    span = d * (k - 1) + 1
    num = size + 2 * p - span
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def pool_candidates(
    shape: Sequence[int],
    *,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
) -> Tensor:
    """Candidates of an N-d max pooling of one sample of shape ``(..., *spatial)``."""
    nd = len(kernel)
    idx = _numbered(shape)
    lead = tuple(shape[:-nd])
    for j in range(nd):
        dim = len(lead) + j
        size, k, s, p, d = shape[dim], kernel[j], stride[j], padding[j], dilation[j]
        out = _out_size(size, k, s, p, d, ceil_mode)
        span = d * (k - 1) + 1
        right = max(0, (out - 1) * s + span - size - p)
        pads = [0, 0] * (idx.dim() - 1 - dim) + [p, right]
        if p or right:
            idx = torch.nn.functional.pad(idx, pads, value=-1)
        idx = idx.unfold(dim, span, s).narrow(dim, 0, out)[..., ::d]
    # idx: (*lead, *out, k_0, ..., k_{nd-1}) -> (units, k)
    k_total = math.prod(kernel)
    return _pad_first(idx.reshape(-1, k_total))


def adaptive_candidates(shape: Sequence[int], output_size: Sequence[int]) -> Tensor:
    """Candidates of an N-d adaptive max pooling (windows floor(i L / o) .. ceil((i+1) L / o))."""
    nd = len(output_size)
    lead = tuple(shape[:-nd])
    spatial = tuple(shape[-nd:])
    per_dim: list[Tensor] = []
    for size, o in zip(spatial, output_size, strict=True):
        starts = [(i * size) // o for i in range(o)]
        ends = [-(-((i + 1) * size) // o) for i in range(o)]
        width = max(e - s for s, e in zip(starts, ends, strict=True))
        rows = [
            list(range(s, e)) + [-1] * (width - (e - s)) for s, e in zip(starts, ends, strict=True)
        ]
        per_dim.append(torch.tensor(rows, dtype=torch.long))  # (o, width)
    # flat spatial index of every (window element) combination
    flat = torch.zeros([1] * (2 * nd), dtype=torch.long)
    valid = torch.ones([1] * (2 * nd), dtype=torch.bool)
    stride = 1
    for j in range(nd - 1, -1, -1):
        t = per_dim[j]
        view = [1] * (2 * nd)
        view[j], view[nd + j] = t.shape[0], t.shape[1]
        flat = flat + (t.clamp(min=0) * stride).reshape(view)
        valid = valid & (t >= 0).reshape(view)
        stride *= spatial[j]
    flat = torch.where(valid, flat, torch.full_like(flat, -1))
    n_sp = math.prod(spatial)
    lead_n = math.prod(lead)
    k = math.prod(int(t.shape[1]) for t in per_dim)
    windows = flat.reshape(-1, k)  # (prod(out), k)
    base = (torch.arange(lead_n) * n_sp)[:, None, None]
    cand = torch.where(windows[None] >= 0, windows[None] + base, torch.full_like(windows[None], -1))
    return _pad_first(cand.reshape(-1, k))


def windows_max(x: Tensor, candidates: Tensor, out_shape: Sequence[int]) -> Tensor:
    """The max over candidates of every sample: ``x`` (B, ...) -> (B, *out_shape)."""
    flat = x.reshape(x.shape[0], -1)
    return flat[:, candidates].amax(dim=2).reshape(x.shape[0], *out_shape)
