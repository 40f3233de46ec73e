"""Activation patterns: packing, and the 128-bit pattern hash that identifies a region.

A region's activation pattern holds one state per unit: for a ResNet that is hundreds of
thousands of units, too much to keep per region. Every region therefore carries a
*pattern hash*, and the whole pattern is kept (packed) only while it is at most
:data:`PATTERN_LIMIT_BITS` bits; above, it is recomputed on demand by evaluating the
network at an interior point (:meth:`geomstore.Partition.patterns`).

The hash is linear: two 64-bit lanes, each ``sum_u state_u * R_u mod 2**64`` with fixed
random 64-bit weights ``R_u`` per unit (seeded, the same on every device). It is computed
layer by layer while the descent runs (a child's hash is its cell's plus the new layer's
term), and two different patterns collide with probability at most about 2**-126 (a
difference of states that is odd somewhere is invertible modulo 2**64). Regions of one
partition have distinct patterns (each pattern's set is convex), so their hashes are
distinct too.

Examples
--------
>>> import torch
>>> h = PatternHash(10)
>>> a = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.uint8)
>>> bool((h.of(a) == h.of(a[:, :4]) + h.of(a[:, 4:], offset=4)).all())
True
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

__all__ = [
    "PATTERN_LIMIT_BITS",
    "PatternHash",
    "hash_bytes",
    "pack_patterns",
    "pack_states",
    "unpack_patterns",
]

PATTERN_LIMIT_BITS = 1 << 16  # whole patterns kept up to 8 KiB per region
_SEED = 0x67656F6D  # "geom"


class PatternHash:
    """The fixed random weights of the pattern hash for a network of ``n_units`` units."""

    def __init__(self, n_units: int, device: torch.device | str = "cpu") -> None:
        r, limbs = _weights(max(n_units, 1))
        self.r = r.to(device)
        self.limbs = limbs.to(device)

    def of(self, states: Tensor, offset: int = 0, *, block: int | None = None) -> Tensor:
        """Hash terms (Q, 2) int64 of ``states`` (Q, units), units starting at ``offset``.

        ``sum_u state_u R_u mod 2**64`` as float64 matrix products with the weights' 16-bit
        limbs: every partial sum is an integer below ``255 * 2**16 * units``, under 2**53
        for up to 2**29 units, so each product is exact whatever its order of additions
        (the same bits on every device); the limbs' sums are then shifted into place
        with int64 arithmetic, which wraps modulo 2**64. ``block`` bounds the float64
        elements converted at once: cache-sized on a CPU (five times faster than 32 MB
        blocks), large on a GPU.
        """
        if block is None:
            block = 1 << 20 if states.device.type == "cpu" else 1 << 26
        q, u = states.shape
        if u >= 1 << 29:  # pragma: no cover - beyond any network partitioned here
            raise ValueError(f"{u} units in one layer: the pattern hash is exact up to 2**29")
        limbs = self.limbs[offset : offset + u].to(states.device)
        out = torch.empty((q, 2), dtype=torch.int64, device=states.device)
        rows = max(1, block // max(1, u))
        scale = torch.tensor([1, 1 << 16, 1 << 32, 1 << 48], device=states.device)
        for lo in range(0, q, rows):
            sums = (states[lo : lo + rows].to(torch.float64) @ limbs).to(torch.int64)
            out[lo : lo + rows] = (sums.view(-1, 2, 4) * scale).sum(2)  # wraps modulo 2**64
        return out


@functools.lru_cache(maxsize=8)
def _weights(n_units: int) -> tuple[Tensor, Tensor]:
    """The hash's random weights (units, 2) int64 and their 16-bit limbs (units, 8) float64,
    limb j of lane l at column 4 l + j: the int64 words read as little-endian 16-bit
    halves, taken unsigned. Read-only: every :class:`PatternHash` of that size shares them.
    """
    g = torch.Generator().manual_seed(_SEED)
    r = torch.randint(-(2**63), 2**63 - 1, (n_units, 2), generator=g)
    if sys.byteorder != "little":  # pragma: no cover - every machine torch supports
        raise RuntimeError("the pattern hash reads int64 weights as little-endian limbs")
    return r, r.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF).to(torch.float64)


def hash_bytes(hashes: np.ndarray) -> pa.Array:
    """(Q, 2) int64 hashes as 16-byte values (little-endian lanes)."""
    data = np.ascontiguousarray(hashes.astype("<i8"))
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(16), data.shape[0], [None, pa.py_buffer(data)]
    )


def pack_patterns(
    states: np.ndarray, bits: list[tuple[int, int, int]], *, rows: int = 1024
) -> pa.Array:
    """Pack unit states into bytes; ``bits`` holds (unit_offset, n_units, bits_per_unit).

    A unit of ``b`` bits writes them most significant first, next to each other. Rows go
    a block at a time through one reused bit matrix (cache-sized: one pass per block).
    """
    return _fixed_binary(_pack_rows(states, bits, rows), states.shape[0])


def _pack_rows(states: np.ndarray, bits: list[tuple[int, int, int]], rows: int) -> np.ndarray:
    if bits and all(b == 1 for _, _, b in bits) and sum(c for _, c, _ in bits) == states.shape[1]:
        return np.packbits(states, axis=1)  # ReLU-only nets
    total = sum(c * b for _, c, b in bits)
    out = np.empty((states.shape[0], (total + 7) // 8), np.uint8)
    mat = np.empty((min(rows, states.shape[0]), total), np.uint8)
    for lo in range(0, states.shape[0], rows):
        blk = states[lo : lo + rows]
        m = mat[: len(blk)]
        pos = 0
        for off, count, b in bits:
            s = blk[:, off : off + count]
            if b == 1:
                np.not_equal(s, 0, out=m[:, pos : pos + count].view(bool))
            else:
                v = m[:, pos : pos + count * b].reshape(len(blk), count, b)
                for j in range(b):
                    np.bitwise_and(s >> (b - 1 - j), 1, out=v[:, :, j])
            pos += count * b
        out[lo : lo + rows] = np.packbits(m, axis=1)
    return out


def pack_states(states: Tensor, bits: list[tuple[int, int, int]]) -> Tensor:
    """:func:`pack_patterns` on ``states``' device: (Q, units) uint8 -> (Q, bytes) uint8.

    The descent packs each finished chunk where it was computed, so only an eighth of the
    states (or less) crosses to the host; the bytes are those of :func:`pack_patterns`.
    """
    if states.device.type == "cpu":  # NumPy's packbits is several times faster there
        return torch.from_numpy(_pack_rows(states.numpy(), bits, 1024))
    return _pack_bits(states, bits)


def _pack_bits(states: Tensor, bits: list[tuple[int, int, int]]) -> Tensor:
    """:func:`pack_states` in tensor operations (the path of GPUs)."""
    q, dev = int(states.shape[0]), states.device
    cols = []
    for off, count, b in bits:
        s = states[:, off : off + count]
        if b == 1:
            cols.append((s != 0).to(torch.uint8))
        else:
            shifts = torch.arange(b - 1, -1, -1, device=dev, dtype=torch.uint8)
            cols.append(((s[:, :, None] >> shifts) & 1).reshape(q, count * b))
    m = torch.cat(cols, 1) if cols else torch.zeros((q, 0), dtype=torch.uint8, device=dev)
    n_bytes = (int(m.shape[1]) + 7) // 8
    m = torch.nn.functional.pad(m, (0, 8 * n_bytes - int(m.shape[1])))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=dev)
    return (m.view(q, n_bytes, 8) * weights).sum(2, dtype=torch.uint8)


def packed_binary(chunks: list[np.ndarray]) -> pa.ChunkedArray:
    """(rows, bytes) uint8 chunks as one fixed-size binary column (a zero byte per row
    when the patterns are empty), without copying them."""
    return pa.chunked_array([_fixed_binary(c, c.shape[0]) for c in chunks])


def unpack_patterns(
    packed: np.ndarray, bits: list[tuple[int, int, int]], n_units: int
) -> np.ndarray:
    """The inverse of :func:`pack_patterns`: (Q, bytes) uint8 -> (Q, n_units) states."""
    flat = np.unpackbits(packed, axis=1)
    states = np.zeros((packed.shape[0], n_units), dtype=np.uint8)
    pos = 0
    for off, count, b in bits:
        for j in range(b):
            block = flat[:, pos + j : pos + j + b * count : b]
            states[:, off : off + count] |= (block << (b - 1 - j)).astype(np.uint8)
        pos += b * count
    return states


def _fixed_binary(packed: np.ndarray, rows: int) -> pa.Array:
    if packed.shape[1] == 0:
        packed = np.zeros((rows, 1), np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(packed.shape[1]), rows, [None, pa.py_buffer(np.ascontiguousarray(packed))]
    )
