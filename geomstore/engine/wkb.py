"""Vectorised WKB encoding of polygons and segments (little-endian, 2-D, ISO WKB).

Layouts (the exact bytes every geometry column holds):
- Polygon: ``01 | uint32 3 | uint32 1 ring | uint32 n+1 points | (n+1) x (f64 x, f64 y)``;
  the ring is counter-clockwise and closed (first point repeated at the end).
- LineString: ``01 | uint32 2 | uint32 2 points | (f64 x0, f64 y0, f64 x1, f64 y1)``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["polygons_wkb", "segments_wkb"]


def polygons_wkb(verts: np.ndarray, n: np.ndarray) -> pa.BinaryArray:
    """Encode padded CCW polygons ``verts`` (P, V, 2) with counts ``n`` (P,) as WKB."""
    p = int(n.shape[0])
    npts = n.astype(np.int64) + 1
    sizes = 13 + 16 * npts
    offsets = np.zeros(p + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    buf = np.zeros(int(offsets[-1]), dtype=np.uint8)
    header = np.zeros((p, 13), dtype=np.uint8)
    header[:, 0] = 1
    header[:, 1] = 3
    header[:, 5] = 1
    header[:, 9:13] = npts.astype("<u4").view(np.uint8).reshape(p, 4)
    hpos = offsets[:-1, None] + np.arange(13)[None, :]
    buf[hpos.reshape(-1)] = header.reshape(-1)
    # closed ring: vertex i for i < n, then vertex 0 again
    width = verts.shape[1]
    ar = np.arange(width + 1)
    take = np.where(ar[None, :] < n[:, None], ar[None, :], 0)
    keep = ar[None, :] <= n[:, None]
    pts = np.take_along_axis(verts, np.minimum(take, width - 1)[..., None].repeat(2, 2), 1)
    coords = np.ascontiguousarray(pts[keep], dtype="<f8").view(np.uint8).reshape(-1, 16)
    first = offsets[:-1] + 13
    point_start = np.repeat(first, npts) + 16 * (
        np.arange(int(npts.sum())) - np.repeat(np.cumsum(npts) - npts, npts)
    )
    buf[(point_start[:, None] + np.arange(16)[None, :]).reshape(-1)] = coords.reshape(-1)
    return (
        pa.Array.from_buffers(
            pa.binary(), p, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(buf)]
        )
        if offsets[-1] < 2**31
        else pa.Array.from_buffers(
            pa.large_binary(), p, [None, pa.py_buffer(offsets), pa.py_buffer(buf)]
        )
    )


def segments_wkb(a: np.ndarray, b: np.ndarray) -> pa.BinaryArray:
    """Encode segments from points ``a`` (S, 2) to ``b`` (S, 2) as WKB LineStrings."""
    s = int(a.shape[0])
    rec = np.zeros((s, 41), dtype=np.uint8)
    rec[:, 0] = 1
    rec[:, 1] = 2
    rec[:, 5] = 2
    xy = np.ascontiguousarray(np.concatenate([a, b], axis=1), dtype="<f8")
    rec[:, 9:] = xy.view(np.uint8).reshape(s, 32)
    offsets = (np.arange(s + 1, dtype=np.int64) * 41).astype(np.int32)
    return pa.Array.from_buffers(
        pa.binary(), s, [None, pa.py_buffer(offsets), pa.py_buffer(rec.reshape(-1))]
    )
