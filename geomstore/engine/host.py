"""Copies of finished columns from the compute device to the host."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_host"]


def to_host(t: Tensor) -> np.ndarray:
    """``t`` as a NumPy array: a view on the CPU, one copy from a GPU.

    The copy goes into a fresh NumPy array (``copy_``) rather than through ``.cpu()``:
    on an H100, 1.4 GB of packed patterns took 0.45 s that way against 0.95-1.26 s.
    """
    if t.device.type == "cpu":
        return t.numpy()
    out = np.empty(tuple(t.shape), dtype=torch.empty(0, dtype=t.dtype).numpy().dtype)
    torch.from_numpy(out).copy_(t)
    return out
