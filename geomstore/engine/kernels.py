"""Small tensor operations written so that a GPU runs them without a sync.

On a GPU the engine is bound by kernel launches and by the syncs that read a value back
to the host (see ``benchmarks/gpu_ops.py``); some library operations sync inside, where
nothing in the calling code shows it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bincount"]


def bincount(index: Tensor, n: int) -> Tensor:
    """``torch.bincount(index, minlength=n)`` for indices known to lie in ``[0, n)``:
    int64 counts of length ``n``.

    CUDA's ``bincount`` reads the indices' minimum and maximum back to the host (two
    syncs) before it counts; there the counts are an ``index_add_`` into zeros instead.
    Integer sums are exact in any order, so they are the same on every run. On the CPU,
    ``bincount`` itself.

    Examples
    --------
    >>> bincount(torch.tensor([0, 2, 2]), 4).tolist()
    [1, 0, 2, 0]
    """
    if index.device.type == "cpu":
        return torch.bincount(index, minlength=n)
    return _added_counts(index, n)


def _added_counts(index: Tensor, n: int) -> Tensor:
    """The counts as an ``index_add_`` of ones into zeros (no sync on a GPU)."""
    ones = torch.ones(index.shape[0], dtype=torch.int64, device=index.device)
    return torch.zeros(n, dtype=torch.int64, device=index.device).index_add_(0, index, ones)
