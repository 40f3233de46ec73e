"""All lines against one convex polygon at once: the arrangement of a cell's lines.

The first nonlinearity meets a single cell (the slice domain) with every one of its
lines, which split rounds would take about 2 log2(regions) rounds to resolve. Here the
faces come from the vertices instead, in a fixed number of tensor operations:

1. points: the domain's corners, where each line enters and leaves it, and every
   pairwise intersection strictly inside it;
2. the sign of every line at every point (zero within the tolerance). In general
   position a point lies on exactly the lines that define it, so it is a corner of
   ``2 ** zeros`` faces, one per choice of side of those lines;
3. a face is its sign vector: grouping the corners by sign vector (bits packed into
   int64 words, one exact ``unique``) gives every face with its corners, which are
   ordered by angle around their mean (faces are convex).

Anything not in general position (a point on more lines than define it: three lines
through a point, a line through a corner, duplicated lines) or too large for memory
returns None, and the caller splits in rounds as before.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geomstore.engine.split import Crossings, CutLog, Polys

__all__ = ["cell_arrangement"]

_BITS = 62  # sign bits per int64 word (the sign bit stays clear)
MAX_ELEMENTS = 1 << 25  # points x lines evaluated at once (float64: 256 MiB)


def cell_arrangement(
    cells: Polys, state0: Tensor, cross: Crossings, tol: float, cuts: CutLog, unit_offset: int
) -> tuple[Polys, Tensor] | None:
    """Split a single cell by all its crossing lines; None where rounds must do it.

    Parameters
    ----------
    cells : Polys
        One convex polygon (counter-clockwise, slots from ``n`` on repeat vertex 0).
    state0, cross : Tensor (1, units), Crossings
        From :func:`geomstore.engine.split.crossings`; ``cross.vals`` (T, 3, 1) holds
        each crossing line's (a0, a1, b).
    tol : float
        Absolute tolerance: a point within ``tol`` of a line lies on it.
    cuts : CutLog
        Receives one cut per line (the whole chord), labelling both faces' sides.

    Returns
    -------
    The faces as Polys (``parent`` 0) and their states, or None when the lines are not in
    general position in the cell or the arrangement is too large to build at once.
    """
    t = len(cross)
    if len(cells) != 1 or t < 2:
        return None
    n_pts = t * (t - 1) // 2 + 2 * t + int(cells.n[0])
    if n_pts * t > MAX_ELEMENTS:
        return None
    dev = state0.device
    k = int(cells.n[0])
    dom = cells.verts[0, :k]  # (k, 2)
    raw = cross.vals[:, :, 0]
    lines = raw / torch.sqrt(raw[:, 0] * raw[:, 0] + raw[:, 1] * raw[:, 1])[:, None]
    a, b = lines[:, :2], lines[:, 2]
    # 1. points, each with the two labels of the sides through it (cut id or -(1 + side))
    first_cut = cuts.count
    fd = dom @ a.T + b  # (k, t): lines at the domain's corners
    if bool((fd.abs() <= tol).any()):
        return None  # a line through a corner
    side_lab = -(1 + torch.arange(k, device=dev))
    corner_lab = torch.stack([side_lab, side_lab.roll(1)], 1)
    # where line i crosses side j (from corner j to j + 1): exactly two sides per line
    f0, f1 = fd, fd.roll(-1, 0)
    hit = (f0 > 0) != (f1 > 0)
    sj, li = torch.nonzero(hit, as_tuple=True)
    s = f0[sj, li] / (f0[sj, li] - f1[sj, li])
    d0, d1 = dom[sj], dom.roll(-1, 0)[sj]
    bpts = d0 + s[:, None] * (d1 - d0)
    blab = torch.stack([first_cut + li, side_lab[sj]], 1)
    # pairwise intersections strictly inside the domain
    i, j = torch.triu_indices(t, t, 1, device=dev)
    det = a[i, 0] * a[j, 1] - a[i, 1] * a[j, 0]
    x = (b[j] * a[i, 1] - b[i] * a[j, 1]) / det
    y = (b[i] * a[j, 0] - b[j] * a[i, 0]) / det
    ipts = torch.stack([x, y], 1)
    edge = dom.roll(-1, 0) - dom
    enorm = edge / torch.sqrt((edge * edge).sum(1))[:, None]
    inside = (
        enorm[:, 0] * (ipts[:, 1, None] - dom[:, 1]) - enorm[:, 1] * (ipts[:, 0, None] - dom[:, 0])
    ).amin(1)  # distance to the domain's border, negative outside (NaN: parallel)
    if bool((inside.abs() <= tol).any()):
        return None  # an intersection on the border
    keep = inside > tol
    ipts, ilab = ipts[keep], torch.stack([first_cut + i[keep], first_cut + j[keep]], 1)
    pts = torch.cat([dom, bpts, ipts])
    labs = torch.cat([corner_lab, blab, ilab])
    # 2. signs of every line at every point; zeros only where the point was defined
    f = pts @ a.T + b
    zero = f.abs() <= tol
    nz = zero.sum(1)
    expect = torch.cat(
        [
            torch.zeros(k, dtype=nz.dtype, device=dev),
            torch.ones(bpts.shape[0], dtype=nz.dtype, device=dev),
            torch.full((ipts.shape[0],), 2, dtype=nz.dtype, device=dev),
        ]
    )
    if bpts.shape[0] != 2 * t or not bool((nz == expect).all()):
        return None
    # 3. corners: one per (point, choice of sides of its zero lines), keyed by sign vector
    words = (t + _BITS - 1) // _BITS
    pad = words * _BITS - t
    weight = torch.pow(2, torch.arange(_BITS, device=dev, dtype=torch.int64))
    bits = torch.nn.functional.pad(f > tol, (0, pad)).view(-1, words, _BITS)
    base = (bits.to(torch.int64) * weight).sum(2)  # (points, words)
    on = labs.clamp(min=first_cut - 1) - first_cut  # line index, or -1 for a domain side
    nzl = torch.where(on >= 0, torch.ones_like(on), torch.zeros_like(on)).sum(1)
    n_combo = torch.pow(2, nzl)  # 1, 2 or 4 corners per point
    owner = torch.repeat_interleave(torch.arange(pts.shape[0], device=dev), n_combo)
    rank = torch.arange(owner.numel(), device=dev) - (torch.cumsum(n_combo, 0) - n_combo)[owner]
    key = base[owner]
    # choice bit c of the point's c-th zero line (labels hold lines first: sort them so)
    olab = on[owner]
    lines_first = torch.sort(olab, dim=1, descending=True).values  # (corners, 2)
    for c in range(2):
        line = lines_first[:, c]
        setb = (line >= 0) & (((rank >> c) & 1) == 1)
        row = torch.nonzero(setb, as_tuple=True)[0]
        ln = line[row]
        key.index_put_(
            (row, ln // _BITS), weight[ln % _BITS], accumulate=True
        )  # the bit was 0 (the point is on the line)
    faces, face_of = torch.unique(key, dim=0, return_inverse=True)
    n_faces = faces.shape[0]
    if n_faces != 1 + t + ipts.shape[0]:
        return None  # Euler's count for lines in general position
    # order each face's corners by angle around their mean
    cpts = pts[owner]
    order = torch.argsort(face_of, stable=True)
    fo, po, lo_ = face_of[order], cpts[order], labs[owner][order]
    cnt = torch.bincount(fo, minlength=n_faces)
    if bool((cnt < 3).any()):
        return None
    start = torch.cumsum(cnt, 0) - cnt
    csum = torch.cumsum(po, 0)
    total = csum[start + cnt - 1] - csum[start] + po[start]
    mean = total / cnt[:, None]
    rel = po - mean[fo]
    ang = torch.atan2(rel[:, 1], rel[:, 0])
    o2 = torch.argsort(ang, stable=True)
    o2 = o2[torch.argsort(fo[o2], stable=True)]
    fo, po, lo_ = fo[o2], po[o2], lo_[o2]
    slot = torch.arange(fo.numel(), device=dev) - start[fo]
    width = int(cnt.max().item()) + 1
    verts = torch.zeros((n_faces, width, 2), dtype=pts.dtype, device=dev)
    verts[fo, slot] = po
    lab = torch.zeros((n_faces, width, 2), dtype=labs.dtype, device=dev)
    lab[fo, slot] = lo_
    ar = torch.arange(width, device=dev)
    padm = ar[None, :] >= cnt[:, None]
    verts = torch.where(padm[:, :, None], verts[:, :1], verts)
    lab = torch.where(padm[:, :, None], lab[:, :1], lab)
    # the side from corner s to s + 1 carries the label both share
    nxt = lab.roll(-1, 1)
    nxt[torch.arange(n_faces, device=dev), cnt - 1] = lab[:, 0]
    a0 = lab[:, :, 0]
    share0 = (a0 == nxt[:, :, 0]) | (a0 == nxt[:, :, 1])
    side = torch.where(share0, a0, lab[:, :, 1])
    # states: the crossing units' bits, the other units as in state0
    fbits = ((faces[:, :, None] >> torch.arange(_BITS, device=dev)) & 1).view(n_faces, -1)
    states = state0.expand(n_faces, -1).clone()
    states[:, cross.unit] = fbits[:, :t].to(states.dtype)
    cuts.add(unit_offset + cross.unit, raw[:, 0], raw[:, 1])
    parent = torch.zeros(n_faces, dtype=torch.long, device=dev)
    return Polys(verts, cnt, side, parent), states
