"""Decision boundary that lies on edges between regions.

The interior pass (:func:`geomstore.engine.tables.boundary_segments`) finds the boundary
where it crosses a region's interior. A tie that holds along a whole edge (a hinge of two
classes' logits) crosses no interior: :func:`with_edge_boundary` finds it among the
edges of the overlay. The edges are screened first, on the compute device
(:func:`edge_candidates`): a boundary edge needs two outputs within a few tolerances of
each other at its midpoint, a level-set edge its output near a level at both ends, and on
generic weights no edge passes. The few that do go to the host for the full test
(:func:`edge_boundary`), which applies the same screens, looser by half, before it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from geomstore.engine.host import to_host

__all__ = ["edge_boundary", "edge_candidates", "with_edge_boundary"]


def edge_boundary(
    a: np.ndarray,
    b: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    cen: np.ndarray,
    amap: np.ndarray,
    cvec: np.ndarray,
    *,
    levels: list[float] | None,
    output: int,
    tol: float,
    slopes: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Decision boundary lying on edges between regions, in the shape of
    :func:`boundary_segments`' answer.

    That pass finds the boundary where it crosses a region's interior. A tie that holds
    along a whole edge (logits ``relu(u) - relu(-u)`` and its negative: the boundary is the
    hinge itself) crosses no interior, and is found here: an edge is boundary when the two
    classes that win just inside its two regions differ and tie at both its ends (within
    ``tol`` of the tie line, as the clipping there counts it); for level sets, when the
    output is at the level at both ends and rises into one region and falls into the other.

    ``a``, ``b`` (E, 2) are the edges' ends, ``left``/``right`` their regions (-1: the
    domain's side), ``cen`` (P, 2) the regions' centroids and ``amap`` (P, K, 2), ``cvec``
    (P, K) their affine maps, all in the same coordinates; ``slopes`` (P,), optional, each
    region's largest output slope (``|amap|`` over classes), computed when not given.
    """
    inner = (left >= 0) & (right >= 0)
    lt = left[inner].astype(np.int64)
    if levels is None and amap.shape[1] >= 2:
        inner[inner] = _near_tie(amap, cvec, lt, a[inner], b[inner], tol, slopes)
    elif levels is not None:
        grad = amap[:, output][lt]
        inner[inner] = _near_level(grad, cvec[:, output][lt], a[inner], b[inner], levels, tol)
    else:
        inner[:] = False
    a, b, lt, rt = a[inner], b[inner], left[inner].astype(np.int64), right[inner].astype(np.int64)
    mid = 0.5 * (a + b)
    seg = b - a
    nrm = np.stack([-seg[:, 1], seg[:, 0]], 1)
    nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-300)

    def into(r: np.ndarray) -> np.ndarray:  # the unit normal pointing into region r
        return np.where((((cen[r] - mid) * nrm).sum(1) < 0)[:, None], -nrm, nrm)

    n_l, n_r = into(lt), into(rt)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("a", "b", "region", "ca", "cb", "lv")}

    def on_line(g_a: np.ndarray, g_b: np.ndarray, grad: np.ndarray) -> np.ndarray:
        tau = tol * np.linalg.norm(grad, axis=1)
        return (np.abs(g_a) <= tau) & (np.abs(g_b) <= tau) & (tau > 0)

    if levels is None and amap.shape[1] >= 2:

        def top_inside(r: np.ndarray, inward: np.ndarray) -> np.ndarray:
            v = np.einsum("ekd,ed->ek", amap[r], mid) + cvec[r]
            best = v.argmax(1)
            ga = amap[r] - amap[r, best][:, None, :]
            tied = v[np.arange(len(r)), best][:, None] - v <= tol * np.linalg.norm(ga, axis=2)
            rise = np.einsum("ekd,ed->ek", amap[r], inward)  # each class into the region
            return np.where(tied, rise, -np.inf).argmax(1)

        t_l, t_r = top_inside(lt, n_l), top_inside(rt, n_r)
        grad = amap[lt, t_l] - amap[lt, t_r]
        c0 = cvec[lt, t_l] - cvec[lt, t_r]
        hit = (t_l != t_r) & on_line((grad * a).sum(1) + c0, (grad * b).sum(1) + c0, grad)
        ca, cb = np.minimum(t_l, t_r)[hit], np.maximum(t_l, t_r)[hit]
        out["region"].append(np.where(t_l[hit] == ca, lt[hit], rt[hit]))
        out["ca"].append(ca)
        out["cb"].append(cb)
        out["lv"].append(np.full(int(hit.sum()), np.nan))
        out["a"].append(a[hit])
        out["b"].append(b[hit])
    elif levels is not None:
        grad = amap[lt, output]
        for level in levels:
            c0 = cvec[lt, output] - level
            s_l = (amap[lt, output] * n_l).sum(1)
            s_r = (amap[rt, output] * n_r).sum(1)
            hit = on_line((grad * a).sum(1) + c0, (grad * b).sum(1) + c0, grad)
            hit &= s_l * s_r < 0
            k = int(hit.sum())
            out["region"].append(lt[hit])
            out["ca"].append(np.full(k, output))
            out["cb"].append(np.full(k, output))
            out["lv"].append(np.full(k, level))
            out["a"].append(a[hit])
            out["b"].append(b[hit])
    return {
        key: (np.concatenate(v) if v else np.zeros((0, 2) if key in "ab" else 0))
        for key, v in out.items()
    }


def _near_tie(
    amap: np.ndarray,
    cvec: np.ndarray,
    r: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    tol: float,
    slopes: np.ndarray | None = None,
) -> np.ndarray:
    """Which edges (ends ``a``, ``b``, region ``r`` on one side) can carry boundary: those
    where region ``r``'s two largest outputs at the edge's midpoint lie within a few
    tolerances of each other. A screen that never drops a boundary edge.

    :func:`edge_boundary` takes class ``t_l`` tied with ``r``'s top value ``v*`` within
    ``tol * |grad|`` and a class ``t_r != t_l`` whose output meets ``t_l``'s within
    ``tol * |grad|`` at both ends, hence at the midpoint; each ``|grad|`` is at most
    ``2 M`` (``M``: ``r``'s largest output slope), so both lie within ``4 tol M`` of ``v*``
    and so does the second largest output. The screen keeps twice that and a rounding
    margin. ``slopes``: each region's ``M``, when the caller has them.
    """
    mid = 0.5 * (a + b)
    g0, g1 = amap[:, :, 0], amap[:, :, 1]
    v = g0[r] * mid[:, :1] + g1[r] * mid[:, 1:] + cvec[r]
    top = np.partition(v, -2, axis=1)
    slope = (_slopes(amap) if slopes is None else slopes)[r]
    ends = np.maximum(np.abs(a), np.abs(b))  # the full test evaluates at the ends
    size = slope * ends.sum(1) + np.abs(cvec[r]).max(1)
    margin = ROUNDING * size
    return top[:, -1] - top[:, -2] <= 8.0 * tol * slope + margin


def _near_level(
    grad: np.ndarray, c: np.ndarray, a: np.ndarray, b: np.ndarray, levels: list[float], tol: float
) -> np.ndarray:
    """Which edges (ends ``a``, ``b``; one region's output ``grad . x + c`` beside each) can
    carry a level set: those where the output is within twice :func:`edge_boundary`'s
    tolerance of a level at both ends. A screen that never drops a level-set edge."""
    ends = np.maximum(np.abs(a), np.abs(b))
    size = np.abs(grad[:, 0]) * ends[:, 0] + np.abs(grad[:, 1]) * ends[:, 1] + np.abs(c)
    size += max(abs(v) for v in levels) if levels else 0.0
    tau = 2.0 * tol * np.sqrt(grad[:, 0] ** 2 + grad[:, 1] ** 2) + ROUNDING * size
    g_a = grad[:, 0] * a[:, 0] + grad[:, 1] * a[:, 1] + c
    g_b = grad[:, 0] * b[:, 0] + grad[:, 1] * b[:, 1] + c
    keep = np.zeros(len(c), dtype=bool)
    for level in levels:
        keep |= (np.abs(g_a - level) <= tau) & (np.abs(g_b - level) <= tau)
    return keep


def edge_candidates(
    a: Tensor,
    b: Tensor,
    left: Tensor,
    right: Tensor,
    amap: Tensor,
    c_centre: Tensor,
    levels: list[float] | None,
    output: int,
    tol: float,
) -> Tensor:
    """The edges that can carry boundary (indices, on the tensors' device): the screens of
    :func:`_near_tie` and :func:`_near_level`, twice as loose, so that rounding on the
    device never drops an edge the host would keep. Inner edges only (both sides regions).
    """
    dev = a.device
    idx = torch.nonzero((left >= 0) & (right >= 0)).squeeze(1)
    k = int(amap.shape[1])
    if (levels is None and k < 2) or len(idx) == 0:
        return idx[:0]
    if levels is None:
        slopes = torch.sqrt((amap[:, :, 0] ** 2 + amap[:, :, 1] ** 2).amax(1))
    block = max(1, DEVICE_BLOCK // k)  # (edges, classes) temporaries, bounded
    keep = []
    for lo in range(0, len(idx), block):
        e = idx[lo : lo + block]
        r = left.index_select(0, e)
        ea, eb = a.index_select(0, e), b.index_select(0, e)
        if levels is None:
            mid = 0.5 * (ea + eb)
            g = amap.index_select(0, r)  # (E, K, 2)
            c = c_centre.index_select(0, r)
            v = g[:, :, 0] * mid[:, :1] + g[:, :, 1] * mid[:, 1:] + c
            top = v.topk(2, dim=1).values
            slope = slopes.index_select(0, r)
            size = slope * torch.maximum(ea.abs(), eb.abs()).sum(1) + c.abs().amax(1)
            near = top[:, 0] - top[:, 1] <= 16.0 * tol * slope + 2 * ROUNDING * size
        else:
            grad = amap[:, output].index_select(0, r)  # (E, 2)
            c = c_centre[:, output].index_select(0, r)
            ends = torch.maximum(ea.abs(), eb.abs())
            size = (grad.abs() * ends).sum(1) + c.abs() + max((abs(v) for v in levels), default=0.0)
            tau = 4.0 * tol * torch.sqrt((grad * grad).sum(1)) + 2 * ROUNDING * size
            g_a = grad[:, 0] * ea[:, 0] + grad[:, 1] * ea[:, 1] + c
            g_b = grad[:, 0] * eb[:, 0] + grad[:, 1] * eb[:, 1] + c
            near = torch.zeros(len(e), dtype=torch.bool, device=dev)
            for level in levels:
                near |= ((g_a - level).abs() <= tau) & ((g_b - level).abs() <= tau)
        keep.append(e[near])
    return torch.cat(keep)


def _slopes(amap: np.ndarray) -> np.ndarray:
    """Each region's largest output slope: ``|amap|`` (P, K, 2) over its K outputs."""
    return np.sqrt((amap[:, :, 0] ** 2 + amap[:, :, 1] ** 2).max(1))


def _centroids(regions: pa.Table, rows: np.ndarray | None) -> np.ndarray:
    """The stored centroids (P, 2) of the regions table, or of its ``rows``."""
    cols = [regions.column(f"centroid_u{i}") for i in (0, 1)]
    if rows is not None:
        cols = [c.take(pa.array(rows)) for c in cols]
    return np.stack([c.to_numpy() for c in cols], 1)


def with_edge_boundary(
    bd: dict[str, np.ndarray],
    ov: dict[str, Tensor],
    regions: pa.Table,
    centre: np.ndarray,
    amap_t: Tensor,
    c_centre: Tensor,
    lv: list[float] | None,
    output: int,
    tol: float,
) -> dict[str, np.ndarray]:
    """``bd`` and the boundary that lies on edges (:func:`edge_boundary`), in the
    centred coordinates of ``bd``.

    ``ov`` is :func:`~geomstore.engine.tables.edge_overlay`'s answer (centred, on the
    compute device), ``regions`` the regions table (its centroids are read), ``centre``
    the slice's centre, ``amap_t`` (P, K, 2) and ``c_centre`` (P, K) the regions' slopes
    and values at the centre, on the device. The edges' ends are the overlay's, so that a
    segment found on an edge has, once the centre is added back, the edge's stored
    coordinates exactly. On a GPU, or past :data:`SCREEN_FROM` edges, the edges are
    screened where they are (:func:`edge_candidates`) and only the candidates and their
    regions go to the host; a small partition on the CPU is tested there whole, without
    dispatching tensor operations.
    """
    if ov["a"].device.type == "cpu" and len(ov["a"]) < SCREEN_FROM:
        a, b, left, right = (to_host(ov[k]) for k in ("a", "b", "left", "right"))
        cen = _centroids(regions, None) - centre
        amap, cvec, regs = to_host(amap_t), to_host(c_centre), None
    else:
        cand = edge_candidates(
            ov["a"], ov["b"], ov["left"], ov["right"], amap_t, c_centre, lv, output, tol
        )
        if len(cand) == 0:
            return bd
        a, b = (to_host(ov[k].index_select(0, cand)) for k in ("a", "b"))
        lr = to_host(torch.stack([ov[k].index_select(0, cand) for k in ("left", "right")]))
        regs, local = np.unique(lr, return_inverse=True)  # the regions beside candidates
        left, right = local.reshape(lr.shape)
        regs_t = torch.as_tensor(regs, device=amap_t.device)
        amap = to_host(amap_t.index_select(0, regs_t))
        cvec = to_host(c_centre.index_select(0, regs_t))
        cen = _centroids(regions, regs) - centre
    slopes = _slopes(amap) if lv is None and amap.shape[1] >= 2 else None
    parts = [bd]
    for lo in range(0, len(a), EDGE_BLOCK):  # (edges, classes, 2) temporaries, bounded
        s = slice(lo, lo + EDGE_BLOCK)
        on = edge_boundary(
            a[s],
            b[s],
            left[s],
            right[s],
            cen,
            amap,
            cvec,
            levels=lv,
            output=output,
            tol=tol,
            slopes=slopes,
        )
        if len(on["region"]):
            if regs is not None:
                on["region"] = regs[np.asarray(on["region"], dtype=np.int64)]
            parts.append(on)
    if len(parts) == 1:
        return bd
    return {
        k: np.concatenate([np.asarray(q[k]).astype(np.asarray(bd[k]).dtype) for q in parts])
        for k in bd
    }


ROUNDING = 1e-13
"""The edge screens' allowance for rounding, relative to the sizes of the sums they
compare (float64 rounds at 1.1e-16 per operation)."""

EDGE_BLOCK = 1 << 16
"""Edges tested at a time for boundary lying on them (:func:`with_edge_boundary`)."""

SCREEN_FROM = 1 << 16
"""Edges from which a partition on the CPU screens them with tensor operations
(:func:`edge_candidates`) rather than testing all of them on the host at once."""

DEVICE_BLOCK = 1 << 22
"""Edge x class entries screened at a time on the device (:func:`edge_candidates`)."""
