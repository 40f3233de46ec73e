"""Copies of finished columns from the compute device to the host."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

__all__ = ["HostCopies", "to_host"]


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


class HostCopies:
    """Finished chunks on their way to the host while the device computes the next ones.

    On CUDA each chunk is copied in a background thread on a side stream: the copy waits
    for the kernels that made the chunk, then runs beside the descent's next kernels (the
    thread holds the tensor until its copy is done). Elsewhere a chunk is taken as is.
    ``result()`` gives the host arrays in the order they were added.
    """

    overlap = True  # False: copy each chunk when it is added (for comparisons)

    def __init__(self, device: torch.device, *, thread: bool | None = None) -> None:
        self.parts: list[Future[np.ndarray] | np.ndarray] = []
        self.pool: ThreadPoolExecutor | None = None
        self.stream: torch.cuda.Stream | None = None
        if thread if thread is not None else device.type == "cuda" and self.overlap:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="geomstore-copy")
            if device.type == "cuda":
                self.stream = torch.cuda.Stream(device)

    def add(self, t: Tensor) -> None:
        if self.pool is None:
            self.parts.append(to_host(t))
            return
        if self.stream is not None:  # the copy starts after the kernels that made t
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
        self.parts.append(self.pool.submit(self._copy, t))

    def _copy(self, t: Tensor) -> np.ndarray:
        if self.stream is None:
            return to_host(t).copy()
        with torch.cuda.stream(self.stream):
            return to_host(t)

    def result(self) -> list[np.ndarray]:
        try:
            return [p.result() if isinstance(p, Future) else p for p in self.parts]
        finally:
            if self.pool is not None:
                self.pool.shutdown()
