"""Where and with how much memory a partition runs: the device and the memory budget.

The budget sizes the descent's chunks, and the chunks decide the order of the regions and
the last bits of their affine maps: the default depends on the device alone, so that the
same call on the same device repeats bit for bit.
"""

from __future__ import annotations

import os
import re

import torch

from geomstore.errors import GeomstoreError

__all__ = ["default_memory", "parse_memory", "resolve_device"]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(memory: int | str) -> int:
    """Bytes from an int or a string such as ``"4GiB"``, ``"512MB"``, ``"2G"``.

    Examples
    --------
    >>> parse_memory("4GiB"), parse_memory("512 MiB"), parse_memory(1 << 30)
    (4294967296, 536870912, 1073741824)
    """
    if isinstance(memory, int) and not isinstance(memory, bool):
        value = memory
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(memory), re.I)
        if m is None:
            raise GeomstoreError(
                f"memory must be a number of bytes or a size such as '4GiB' or '512MiB'; "
                f"got {memory!r}."
            )
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < 1 << 24:
        raise GeomstoreError(f"memory must be at least 16MiB; got {memory!r}.")
    return value


def default_memory(device: torch.device) -> int:
    """The default budget: half the GPU's memory on CUDA, else min(4 GiB, RAM / 4).

    The budget sizes the chunks, and the chunks decide the order of the regions and the
    last bits of their affine maps; so it depends on the device alone, not on what other
    processes hold at the moment: the same call on the same device gives the same bits.
    Only when others hold more than a quarter of the GPU does it shrink, to three
    quarters of the free memory.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(1 << 28, min(total // 2, free * 3 // 4))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        ram = 16 << 30
    return int(min(4 << 30, max(1 << 28, ram // 4)))


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other values are checked.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device in ("cpu", "cuda") or str(device).startswith("cuda:"):
        dev = torch.device(device)
    else:
        raise GeomstoreError(f"device must be one of 'auto', 'cpu', 'cuda[:N]'; got {device!r}.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GeomstoreError("device 'cuda' was asked for but CUDA is not available; use 'auto'.")
    return dev
