"""Every cell split by all its crossing lines at once: the line arrangements of a layer.

Split rounds take one line per polygon per round, so a layer costs as many rounds as its
longest chain of splits. Here the children of every cell come from vertices instead, in
a fixed number of tensor operations for the whole layer:

1. points: each cell's corners, where each of its lines enters and leaves it, and every
   intersection of two of its lines strictly inside it;
2. the sign of each of the cell's lines at each point (zero within the tolerance). In
   general position a point lies on exactly the lines that define it, so it is a corner
   of ``2 ** zeros`` children, one per choice of side of those lines;
3. a child is its cell and sign vector: grouping the corners by (cell, sign bits packed
   into int64 words), one exact ``unique``, gives every child with its corners, which
   are ordered by angle around their mean (children are convex).

A cell not in general position (a point on more lines than define it: three lines
through a point, a line through a corner, duplicated lines; or a face count other than
Euler's ``1 + lines + intersections``) is left to the split rounds, which handle every
degenerate case; so are all cells when the layer is too large to build at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geomstore.engine.kernels import bincount
from geomstore.engine.split import Crossings, CutLog, Polys, pad_polys

__all__ = ["MAX_ELEMENTS", "arrangements"]

_BITS = 62  # sign bits per int64 word (the sign bit stays clear)
MAX_ELEMENTS = 1 << 24  # (point, line) pairs evaluated at once (~40 bytes each)


def arrangements(
    cells: Polys, state0: Tensor, cross: Crossings, tol: float, cuts: CutLog, unit_offset: int
) -> tuple[Polys, Tensor, Tensor] | None:
    """Split cells by all their crossing lines at once.

    Parameters
    ----------
    cells : Polys
        Convex polygons (counter-clockwise, slots from ``n`` on repeat vertex 0).
    state0, cross : Tensor (cells, units), Crossings
        From :func:`geomstore.engine.split.crossings`; ``cross.vals`` (T, 3, 1) holds
        each crossing line's (a0, a1, b).
    tol : float
        Absolute tolerance: a point within ``tol`` of a line lies on it.
    cuts : CutLog
        Receives one cut per crossing pair (the line's whole chord in its cell).

    Returns
    -------
    (children, states, left): the children of the cells in general position (``parent``
    indexes ``cells``) with their states, and a mask of the cells left for split rounds;
    or None when the layer is too large to build at once (nothing is logged then).
    """
    dev = state0.device
    p = len(cells)
    t = len(cross)
    k = bincount(cross.cell, p)
    # (point, line) pairs: each cell's points (corners, 2 per line, intersections) x lines,
    # the most lines and the most corners of a cell: one sync for the three
    pairs = (k * (k * (k + 3) // 2 + cells.n)).sum()  # k (k - 1) / 2 + 2 k
    n_pairs, kmax, nmax = torch.stack([pairs, k.max(), cells.n.max()]).tolist()
    if n_pairs > MAX_ELEMENTS:
        return None
    first_cut = cuts.count
    start = torch.cumsum(k, 0) - k
    raw = cross.vals[:, :, 0]
    lines = raw / torch.linalg.vector_norm(raw[:, :2], dim=1, keepdim=True)
    verts, side = pad_polys(cells.verts, cells.side, nmax + 1)
    w = int(verts.shape[1])
    ar = torch.arange(w, device=dev)
    valid = ar[None, :] < cells.n[:, None]
    bad = torch.zeros(p + 1, dtype=torch.bool, device=dev)  # slot p: a spill (see _mark)

    # 1. points with their cell and the two labels of the sides through them
    cc, ci = torch.nonzero(valid, as_tuple=True)  # corners
    prev = torch.where(ci == 0, cells.n[cc] - 1, ci - 1)
    corner_lab = torch.stack([side[cc, ci], side[cc, prev]], 1)
    corner_pts = verts[cc, ci]
    # where each line enters and leaves its cell (through no corner: checked below)
    fv = torch.baddbmm(lines[:, 2:, None], verts[cross.cell], lines[:, :2, None]).squeeze(2)
    pos = fv > 0
    hit = (pos[:, :-1] != pos[:, 1:]) & valid[cross.cell, :-1]
    bt, bi = torch.nonzero(hit, as_tuple=True)
    f0, f1 = fv[bt, bi], fv[bt, bi + 1]
    s = f0 / (f0 - f1)
    v0 = verts[cross.cell[bt], bi]
    b_pts = v0 + s[:, None] * (verts[cross.cell[bt], bi + 1] - v0)
    b_lab = torch.stack([first_cut + bt, side[cross.cell[bt], bi]], 1)
    _mark(bad, cross.cell, bincount(bt, t) != 2)
    # intersections of two lines of the same cell, strictly inside it
    if p == 1:  # the first layer: every pair of lines
        i, j = torch.triu_indices(t, t, 1, device=dev)
    else:
        after = start[cross.cell] + k[cross.cell] - 1 - torch.arange(t, device=dev)
        i = torch.repeat_interleave(torch.arange(t, device=dev), after)
        j = i + 1 + torch.arange(i.numel(), device=dev) - (torch.cumsum(after, 0) - after)[i]
    # the lines' meeting point in homogeneous coordinates: the cross product of (a0, a1, b)
    hom = torch.linalg.cross(lines[i], lines[j])
    i_pts = hom[:, :2] / hom[:, 2:]
    i_cell = cross.cell[i]
    edge = verts[:, 1:] - verts[:, :-1]
    enorm = edge / torch.sqrt((edge * edge).sum(2, keepdim=True)).clamp(min=1e-300)
    inward = torch.stack([-enorm[..., 1], enorm[..., 0]], 2)  # the sides' inner normals
    rel = i_pts[:, None, :] - verts[i_cell, :-1]
    dist = (inward[i_cell] * rel).sum(2)
    dist = torch.where(valid[i_cell, :-1], dist, torch.inf).amin(1)  # NaN: parallel lines
    _mark(bad, i_cell, dist.abs() <= tol)  # an intersection on the cell's border
    inner = torch.nonzero(dist > tol).squeeze(1)  # one sync for the four selections
    i_pts, i_cell = i_pts[inner], i_cell[inner]
    i_lab = torch.stack([first_cut + i[inner], first_cut + j[inner]], 1)
    pts = torch.cat([corner_pts, b_pts, i_pts])
    labs = torch.cat([corner_lab, b_lab, i_lab])
    pcell = torch.cat([cc, cross.cell[bt], i_cell])
    expect = torch.cat([torch.zeros_like(cc), torch.ones_like(bt), torch.full_like(i_cell, 2)])

    # 2. signs of each cell's lines at its points (point, line) pairs, ragged: a point
    # meets only its own cell's lines; zeros only where the point was defined
    words = max(1, (kmax + _BITS - 1) // _BITS)
    weight = torch.pow(2, torch.arange(_BITS, device=dev, dtype=torch.int64))
    n_all = int(pts.shape[0])
    if p == 1:  # one cell: all points against all lines, one matrix product
        f = torch.addmm(lines[:, 2], pts, lines[:, :2].T)
        n_zero = (f.abs() <= tol).sum(1)
        up = torch.nn.functional.pad(f > tol, (0, words * _BITS - t))
        bits = (up.view(n_all, words, _BITS).to(torch.int64) * weight).sum(2)
    else:  # (point, line of its cell) pairs, ragged
        per = k[pcell]
        pt_of = torch.repeat_interleave(torch.arange(n_all, device=dev), per)
        pl = torch.arange(pt_of.numel(), device=dev) - (torch.cumsum(per, 0) - per)[pt_of]
        li = start[pcell[pt_of]] + pl
        f = (lines[li, :2] * pts[pt_of]).sum(1) + lines[li, 2]
        n_zero = torch.zeros(n_all, dtype=torch.int64, device=dev)
        n_zero.index_add_(0, pt_of, (f.abs() <= tol).to(torch.int64))
        up = f > tol
        bits = torch.zeros((n_all, words), dtype=torch.int64, device=dev)
        ui = torch.nonzero(up).squeeze(1)
        pu = pl[ui]
        bits.index_put_((pt_of[ui], pu // _BITS), weight[pu % _BITS], accumulate=True)
    _mark(bad, pcell, n_zero != expect)
    n_inner = bincount(i_cell, p)

    # 3. corners: one per (point, choice of sides of its zero lines), keyed by sign vector
    base = torch.cat([pcell[:, None], bits], 1)  # (points, 1 + words): cell, then sign bits
    on = torch.where(labs >= first_cut, labs - first_cut - start[pcell, None], -1)
    n_combo = torch.pow(2, (on >= 0).sum(1))
    owner = torch.repeat_interleave(torch.arange(pts.shape[0], device=dev), n_combo)
    rank = torch.arange(owner.numel(), device=dev) - (torch.cumsum(n_combo, 0) - n_combo)[owner]
    key = base[owner]
    lines_first = torch.sort(on[owner], dim=1, descending=True).values[:, :2]
    # the c-th zero line takes side bit c of the corner's rank
    pick = (lines_first >= 0) & ((rank[:, None] >> torch.arange(2, device=dev)) & 1 == 1)
    row, c = torch.nonzero(pick, as_tuple=True)
    ln = lines_first[row, c]
    key.index_put_((row, 1 + ln // _BITS), weight[ln % _BITS], accumulate=True)
    faces, face_of = _unique_rows(key)
    fcell = faces[:, 0]
    cnt = bincount(face_of, int(faces.shape[0]))
    _mark(bad, fcell, cnt < 3)
    bad = bad[:p] | (bincount(fcell, p) != 1 + k + n_inner)  # Euler
    good_face = ~bad[fcell]
    keep = good_face[face_of]
    renum = torch.cumsum(good_face, 0) - 1
    gi = torch.nonzero(good_face).squeeze(1)
    faces, fcell, cnt = faces[gi], fcell[gi], cnt[gi]
    ki = torch.nonzero(keep).squeeze(1)
    face_of = renum[face_of[ki]]
    kept = owner[ki]
    n_faces = int(faces.shape[0])

    # order each child's corners by angle around their mean
    order = torch.argsort(face_of, stable=True)
    fo, po, lo = face_of[order], pts[kept][order], labs[kept][order]
    fstart = torch.cumsum(cnt, 0) - cnt
    slot = torch.arange(fo.numel(), device=dev) - fstart[fo]
    width = int(cnt.max().item()) + 1 if n_faces else 4
    # each child's mean corner from its own corners (a padded sum: no prefix sums over all
    # corners, whose differences lose the small faces' digits, and no CUDA scan along dim 0,
    # which took half the GPU time of the benchmark MLPs on an H200)
    acc = torch.zeros((n_faces, width, 2), dtype=po.dtype, device=dev)
    acc[fo, slot] = po
    mean = acc.sum(1) / cnt[:, None]
    d = po - mean[fo]
    o2 = torch.argsort(torch.atan2(d[:, 1], d[:, 0]), stable=True)
    o2 = o2[torch.argsort(fo[o2], stable=True)]
    fo, po, lo = fo[o2], po[o2], lo[o2]
    slot = torch.arange(fo.numel(), device=dev) - fstart[fo]
    out_v = torch.zeros((n_faces, width, 2), dtype=pts.dtype, device=dev)
    out_v[fo, slot] = po
    lab = torch.zeros((n_faces, width, 2), dtype=labs.dtype, device=dev)
    lab[fo, slot] = lo
    padm = torch.arange(width, device=dev)[None, :] >= cnt[:, None]
    out_v = torch.where(padm[:, :, None], out_v[:, :1], out_v)
    lab = torch.where(padm[:, :, None], lab[:, :1], lab)
    # the side from corner s to s + 1 carries the label both corners share
    nxt = lab.roll(-1, 1)  # slot cnt - 1 meets slot cnt, a copy of slot 0
    a0 = lab[:, :, 0]
    out_side = torch.where((a0 == nxt[:, :, 0]) | (a0 == nxt[:, :, 1]), a0, lab[:, :, 1])
    # states: the cell's crossing units take the child's bits, the others as in state0
    per = k[fcell]
    fr = torch.repeat_interleave(torch.arange(n_faces, device=dev), per)
    fl = torch.arange(fr.numel(), device=dev) - (torch.cumsum(per, 0) - per)[fr]
    bit = (faces[fr, 1 + fl // _BITS] >> (fl % _BITS)) & 1
    states = state0[fcell]
    states[fr, cross.unit[start[fcell[fr]] + fl]] = bit.to(states.dtype)
    cuts.add(unit_offset + cross.unit, raw[:, 0], raw[:, 1])
    return Polys(out_v, cnt, out_side, fcell), states, bad


def _mark(bad: Tensor, cell: Tensor, cond: Tensor) -> None:
    """Mark ``bad[cell[i]]`` where ``cond[i]``, without a sync: the others go to the spill
    slot, the last of ``bad``."""
    bad.index_fill_(0, cell.masked_fill(~cond, bad.shape[0] - 1), True)


def _unique_rows(key: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows of an int64 matrix (lexicographic order) and each row's index there.

    ``torch.unique(dim=0)`` compares rows one by one on the CPU; stable sorts by column,
    last column first, then one comparison of neighbours do the same in a few operations.
    """
    order = torch.argsort(key[:, -1], stable=True)
    for col in range(key.shape[1] - 2, -1, -1):
        order = order[torch.argsort(key[order, col], stable=True)]
    srt = key[order]
    new = torch.ones(srt.shape[0], dtype=torch.bool, device=key.device)
    new[1:] = (srt[1:] != srt[:-1]).any(1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.cumsum(new, 0) - 1
    return srt[new], inverse
