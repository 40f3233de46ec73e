"""Max-pooling as units: parameters of a pooling node and the input indices of its windows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from geomstore.errors import UnsupportedModelError

if TYPE_CHECKING:
    from geomstore.engine.graph import Nonlinearity

__all__ = ["pool_candidates", "pool_params"]


def _target_name(target: Any) -> str:
    return str(target) if not callable(target) else getattr(target, "__name__", str(target))


def pool_params(
    node: torch.fx.Node, mod: nn.Module | None, args: list[Any], kw: dict[str, Any]
) -> dict[str, Any]:
    if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)):
        p: dict[str, Any] = {
            "kernel_size": mod.kernel_size,
            "stride": mod.stride,
            "padding": mod.padding,
            "dilation": mod.dilation,
            "ceil_mode": mod.ceil_mode,
            "dims": 1 if isinstance(mod, nn.MaxPool1d) else 2,
            "return_indices": mod.return_indices,
        }
    else:
        names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
        p = {k: (args[i + 1] if len(args) > i + 1 else kw.get(k)) for i, k in enumerate(names)}
        p["dims"] = 1 if "1d" in _target_name(node.target) else 2
        p["return_indices"] = kw.get("return_indices", False)
        if p["stride"] in (None, []):
            p["stride"] = p["kernel_size"]
        p["padding"] = p["padding"] or 0
        p["dilation"] = p["dilation"] or 1
    if p["ceil_mode"]:
        raise UnsupportedModelError(f"max-pool {node.name!r} uses ceil_mode=True; unsupported.")
    if p.get("return_indices") and "with_indices" not in str(node.target):
        raise UnsupportedModelError(
            f"max-pool {node.name!r} returns indices; indices are not piecewise linear."
        )
    return p


def pool_candidates(spec: Nonlinearity) -> Tensor:
    """Flat input indices of every pooling window, padded with the window's first index."""
    p = spec.pool
    shape = spec.in_shape
    if p["dims"] == 1:
        shape = (shape[0], 1, shape[1]) if len(shape) == 2 else (1, 1, shape[0])

    def pair(v: Any, neutral: int) -> tuple[int, int]:
        """(height, width); a 1-D pool has a neutral height (kernel 1, padding 0)."""
        if isinstance(v, (tuple, list)):
            return (neutral, int(v[0])) if p["dims"] == 1 else (int(v[0]), int(v[1]))
        return (neutral, int(v)) if p["dims"] == 1 else (int(v), int(v))

    c, h, w = shape[-3], shape[-2], shape[-1]
    lead = 1
    for dim in shape[:-3]:
        lead *= dim
    idx = torch.arange(1, lead * c * h * w + 1, dtype=torch.float64).reshape(lead * c, 1, h, w)
    k, st, pad, dil = (
        pair(p["kernel_size"], 1),
        pair(p["stride"], 1),
        pair(p["padding"], 0),
        pair(p["dilation"], 1),
    )
    cols = F.unfold(idx, k, dilation=dil, padding=pad, stride=st)  # (lc, kk, L)
    cand = cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).round().long() - 1
    valid = cand >= 0
    # replace padding (-1) by the window's first valid index: duplicates tie and never win
    lead_idx = cand.masked_fill(~valid, 1 << 40).min(dim=1, keepdim=True).values
    return torch.where(valid, cand, lead_idx.expand_as(cand))
