"""Vectorised WKB encoding of polygons and segments (little-endian, 2-D, ISO WKB).

Layouts (the exact bytes every geometry column holds):
- Polygon: ``01 | uint32 3 | uint32 1 ring | uint32 n+1 points | (n+1) x (f64 x, f64 y)``;
  the ring is counter-clockwise and closed (first point repeated at the end).
- LineString: ``01 | uint32 2 | uint32 2 points | (f64 x0, f64 y0, f64 x1, f64 y1)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from geomstore.engine.host import to_host

__all__ = ["polygons_wkb", "segments_wkb"]


def polygons_wkb(verts: Any, n: Any, *, rows: int = 1 << 18) -> pa.BinaryArray:
    """Encode padded CCW polygons ``verts`` (P, V, 2) with counts ``n`` (P,) as WKB.

    Tensors are encoded where they are (a GPU writes the bytes; one copy brings them
    back), ``rows`` polygons at a time: each block is a matrix of padded records whose
    valid bytes, read row by row, are the records back to back.
    """
    verts_t = torch.as_tensor(verts, dtype=torch.float64)
    n_t = torch.as_tensor(n).to(device=verts_t.device, dtype=torch.int64)
    p, width = int(n_t.shape[0]), int(verts_t.shape[1])
    sizes = 13 + 16 * (n_t + 1)
    offsets = torch.zeros(p + 1, dtype=torch.int64, device=verts_t.device)
    torch.cumsum(sizes, 0, out=offsets[1:])
    ar = torch.arange(width + 1, device=verts_t.device)
    head = torch.tensor([1, 3, 0, 0, 0, 1, 0, 0, 0], dtype=torch.uint8, device=verts_t.device)
    parts = []
    for lo in range(0, p, rows):
        v, m = verts_t[lo : lo + rows], n_t[lo : lo + rows]
        # closed ring: vertex i for i < n, then vertex 0 again (and padding after it)
        take = torch.where(ar[None, :] < m[:, None], ar[None, :], 0).clamp(max=width - 1)
        pts = v.gather(1, take[..., None].expand(-1, -1, 2)).contiguous()
        npts = (m + 1).to(torch.int32).contiguous().view(torch.uint8).reshape(-1, 4)
        rec = torch.cat(
            [head.expand(len(m), -1), npts, pts.view(torch.uint8).reshape(len(m), -1)], 1
        )
        full = torch.arange(rec.shape[1], device=rec.device)[None, :] < sizes[lo : lo + rows, None]
        parts.append(rec[full])
    buf = to_host(torch.cat(parts)) if parts else np.zeros(0, np.uint8)
    return _binary(to_host(offsets), buf)


def segments_wkb(a: Any, b: Any | None = None) -> pa.BinaryArray:
    """Encode segments from points ``a`` (S, 2) to ``b`` (S, 2) as WKB LineStrings (where
    the tensors are, like :func:`polygons_wkb`); ``b`` None: ``a`` (S, 4) holds both."""
    xy = torch.as_tensor(a, dtype=torch.float64)
    if b is not None:
        xy = torch.cat([xy, torch.as_tensor(b, dtype=torch.float64).to(xy.device)], 1)
    s = int(xy.shape[0])
    head = torch.tensor([1, 2, 0, 0, 0, 2, 0, 0, 0], dtype=torch.uint8, device=xy.device)
    raw = xy.contiguous().view(torch.uint8).view(s, 32)
    buf = to_host(torch.cat([head.expand(s, -1), raw], 1).view(-1))
    return _binary(np.arange(s + 1, dtype=np.int64) * 41, buf)


def _binary(offsets: np.ndarray, buf: np.ndarray) -> pa.BinaryArray:
    """Records back to back in ``buf`` with int64 ``offsets`` as a binary column (large
    binary past 2 GiB), wrapping the buffers."""
    rows = len(offsets) - 1
    if offsets[-1] < 2**31:
        return pa.Array.from_buffers(
            pa.binary(), rows, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(buf)]
        )
    return pa.Array.from_buffers(
        pa.large_binary(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(buf)]
    )
