"""From raw regions to the three Arrow tables: regions, edges and boundary."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from geomstore.engine.host import to_host
from geomstore.engine.split import clip_both, pad_polys
from geomstore.engine.wkb import segments_wkb

__all__ = [
    "boundary_segments",
    "edge_overlay",
    "polygon_measures",
]


def _sides(n: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Which slots of padded polygons hold vertices, and the index (P, width, 2) of each
    vertex's successor, for ``gather`` along dim 1."""
    ar = torch.arange(width, device=n.device)
    nc = n.unsqueeze(1)
    nxt = (ar + 1) % nc.clamp(min=1)
    return ar < nc, nxt.unsqueeze(2).expand(-1, -1, 2)


def polygon_measures(verts: Any, n: Any) -> tuple[Any, Any]:
    """Areas (P,) and centroids (P, 2) of padded CCW polygons (shoelace, centred per polygon).

    Tensors in, tensors out (on their device); NumPy arrays in, NumPy arrays out.
    """
    if isinstance(verts, np.ndarray):
        area, cen = polygon_measures(torch.from_numpy(verts), torch.from_numpy(np.asarray(n)))
        return area.numpy(), cen.numpy()
    valid, nxt = _sides(n, int(verts.shape[1]))
    base = verts[:, :1, :]
    rel = torch.where(valid[..., None], verts - base, 0.0)
    reln = rel.gather(1, nxt)
    cross = (rel[..., 0] * reln[..., 1] - reln[..., 0] * rel[..., 1]) * valid
    area = 0.5 * cross.sum(1)
    pos = (area > 0).unsqueeze(1)
    safe = torch.where(pos, area.unsqueeze(1), 1.0)
    moment = ((rel + reln) * cross.unsqueeze(2)).sum(1) / (6 * safe)
    mean = rel.sum(1) / n.clamp(min=1).unsqueeze(1)
    return area, torch.where(pos, moment, mean) + base[:, 0, :]


def edge_overlay(
    verts: Tensor,
    n: Tensor,
    side: Tensor,
    cut_units: Tensor,
    cut_dirs: Tensor,
    min_length: float,
) -> dict[str, Tensor]:
    """Every boundary segment once, with the regions on both sides (tensors on one device).

    Both children of a cut carry the cut's chord as a side; later cuts subdivide either
    copy independently. Overlaying the two subdivisions of each chord gives the maximal
    segments shared by exactly two regions.
    """
    dev = verts.device
    width = int(verts.shape[1])
    valid, nxt = _sides(n, width)
    # compactions by index (one sync each) rather than by mask (one per tensor on a GPU)
    vi = torch.nonzero(valid.reshape(-1)).squeeze(1)
    a = verts.reshape(-1, 2).index_select(0, vi)
    b = verts.gather(1, nxt).reshape(-1, 2).index_select(0, vi)
    lab = side.reshape(-1).index_select(0, vi)
    reg = vi.div(width, rounding_mode="floor")
    border = lab < 0
    nb = int(border.sum())
    order = torch.argsort(~border, stable=True)  # the border's sides first, in order
    bi, mi = order[:nb], order[nb:]
    out_a, out_b = [a.index_select(0, bi)], [b.index_select(0, bi)]
    left, right = [reg.index_select(0, bi)], [torch.full((nb,), -1, device=dev)]
    unit, bidx = [torch.full((nb,), -1, device=dev)], [-(lab.index_select(0, bi) + 1)]
    c, a, b, reg = (t.index_select(0, mi) for t in (lab, a, b, reg))
    if c.numel():
        d = cut_dirs[c]
        nrm = torch.stack([-d[:, 1], d[:, 0]], 1)
        t0 = (a * d).sum(1)
        t1 = (b * d).sum(1)
        s = (a * nrm).sum(1)
        grp = (t1 < t0).to(torch.int64)
        lo, hi = torch.minimum(t0, t1), torch.maximum(t0, t1)
        # One sort of all pieces by (chord, start, side): three stable sorts, last key
        # first. Each start opens an elementary interval that runs to the next start on
        # the same chord (or the chord's end); the piece of each side covering it is the
        # last of that side started so far.
        o = torch.argsort(grp, stable=True)
        o = o[torch.argsort(lo[o], stable=True)]
        o = o[torch.argsort(c[o], stable=True)]
        sc, slo, sgrp = c[o], lo[o], grp[o]
        k = int(o.numel())
        pos = torch.arange(k, device=dev)
        new_chord = torch.ones(k, dtype=torch.bool, device=dev)
        new_chord[1:] = sc[1:] != sc[:-1]
        chord_start = torch.cummax(torch.where(new_chord, pos, 0), 0).values
        # per side (rows 0 and 1): the last piece of that side started so far on the chord
        sides = torch.arange(2, device=dev)[:, None]
        last = torch.cummax(torch.where(sgrp == sides, pos, -1), 1).values
        owner = torch.where(last >= chord_start, o[last.clamp(min=0)], -1)
        nxt_lo = torch.empty(k, dtype=slo.dtype, device=dev)
        nxt_lo[:-1] = slo[1:]
        end = torch.ones(k, dtype=torch.bool, device=dev)
        end[:-1] = new_chord[1:]
        # the chord's end: the largest end point of its pieces (at most k chords)
        chord_id = torch.cumsum(new_chord, 0) - 1
        chord_hi = torch.full((k,), -torch.inf, dtype=hi.dtype, device=dev)
        chord_hi.scatter_reduce_(0, chord_id, hi[o], "amax")
        nxt_lo = torch.where(end, chord_hi.index_select(0, chord_id), nxt_lo)
        ki = torch.nonzero(nxt_lo - slo > min_length).squeeze(1)
        ic, ilo, ihi = sc[ki], slo[ki], nxt_lo[ki]
        p01 = owner.index_select(1, ki)
        has, p01 = p01 >= 0, p01.clamp(min=0)
        chord_s = torch.where(has[0], s[p01[0]], s[p01[1]])
        dd = cut_dirs[ic]
        nn_ = torch.stack([-dd[:, 1], dd[:, 0]], 1)
        ends = torch.stack([ilo, ihi])[:, :, None] * dd + chord_s[:, None] * nn_
        out_a.append(ends[0])
        out_b.append(ends[1])
        lr = torch.where(has, reg[p01], -1)
        left.append(lr[0])
        right.append(lr[1])
        unit.append(cut_units[ic])
        bidx.append(torch.full((int(ic.numel()),), -1, device=dev))
    return {
        "a": torch.cat(out_a),
        "b": torch.cat(out_b),
        "left": torch.cat(left),
        "right": torch.cat(right),
        "unit": torch.cat(unit),
        "border": torch.cat(bidx),
    }


def _clip_keep_positive(
    verts: torch.Tensor,
    n: torch.Tensor,
    side: torch.Tensor,
    a: torch.Tensor,
    label: torch.Tensor,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip polygons to {a0 x + a1 y + b >= 0}; returns verts, n, side and a keep mask.

    Polygons the line does not cross come back unchanged (kept unless wholly negative).
    """
    verts, side = pad_polys(verts, side, int(n.max().item()) + 1 if n.numel() else 1)
    f = torch.baddbmm(a[:, 2:, None], verts, a[:, :2, None]).squeeze(2)
    tau = tol * torch.linalg.vector_norm(a[:, :2], dim=1)
    f = torch.where(f.abs() <= tau[:, None], 0.0, f)
    hi, lo = f.amax(1), f.amin(1)  # padding repeats vertex 0
    keep = (hi > 0) | (lo >= 0)  # all-zero (degenerate) counts as kept
    cv, cn, cs = clip_both(verts, f, n, side, label)
    p = int(n.shape[0])
    split = (hi > 0) & (lo < 0)
    verts, side = pad_polys(verts, side, int(cv.shape[1]))
    verts = torch.where(split[:, None, None], cv[:p], verts)
    side = torch.where(split[:, None], cs[:p], side)
    return verts, torch.where(split, cn[:p], n), side, keep


def boundary_segments(
    verts: Any,
    n: Any,
    amap: Any,
    cvec: Any,
    *,
    levels: list[float] | None,
    output: int,
    tol: float,
    screen: bool | None = None,
) -> dict[str, np.ndarray]:
    """Decision-boundary segments inside every region.

    ``amap`` (P, K, 2) and ``cvec`` (P, K) are the regions' affine maps in the same
    coordinates as ``verts``. With ``levels`` None and K >= 2, returns where the top two
    outputs tie (class pair a < b); otherwise the level sets of output ``output``.
    Tensors on a GPU are screened where they are (``screen``, by default off on a CPU,
    where the NumPy pass makes the same test): only the regions the boundary may cross
    come to the host.
    """
    if isinstance(verts, Tensor) and not (
        screen if screen is not None else verts.device.type != "cpu"
    ):
        host = [to_host(t) for t in (verts, n, amap, cvec)]
        return boundary_segments(*host, levels=levels, output=output, tol=tol)
    if isinstance(verts, Tensor):
        ids = torch.nonzero(_boundary_candidates(verts, n, amap, cvec, levels, output, tol))
        ids = ids.squeeze(1)
        host = [to_host(t[ids]) for t in (verts, n, amap, cvec)]
        out = boundary_segments(*host, levels=levels, output=output, tol=tol)
        out["region"] = to_host(ids)[out["region"].astype(np.int64)]
        return out
    vals = np.einsum("pvd,pkd->pvk", verts, amap) + cvec[:, None, :]
    valid = np.arange(verts.shape[1])[None, :] < n[:, None]
    k = amap.shape[1]
    res: dict[str, list[np.ndarray]] = {
        "a": [],
        "b": [],
        "region": [],
        "ca": [],
        "cb": [],
        "lv": [],
    }
    if levels is not None:
        for level in levels:
            g = vals[..., output] - level
            hit = np.nonzero(((g > 0) & valid).any(1) & ((g < 0) & valid).any(1))[0]
            if hit.size == 0:
                continue
            coef = np.concatenate([amap[hit, output], (cvec[hit, output] - level)[:, None]], axis=1)
            _collect(
                res,
                verts[hit],
                n[hit],
                hit,
                coef,
                np.full(hit.size, 1),
                tol,
                pair=(output, output),
                level=level,
            )
    else:
        top = vals.argmax(2)
        first = top[:, :1]
        mixed = ((top != first) & valid).any(1)
        srt = np.sort(vals, axis=2)
        near_tie = ((srt[..., -1] - srt[..., -2] <= tol * (1 + np.abs(srt[..., -1]))) & valid).any(
            1
        )
        hit = np.nonzero(mixed | near_tie)[0]
        for i in range(k):
            if hit.size == 0:
                break
            tv = torch.as_tensor(verts[hit])
            tn = torch.as_tensor(n[hit])
            ts = torch.full(tv.shape[:2], -1, dtype=torch.long)
            alive = torch.ones(hit.size, dtype=torch.bool)
            for j in range(k):
                if j == i:
                    continue
                coef = np.concatenate(
                    [amap[hit, i] - amap[hit, j], (cvec[hit, i] - cvec[hit, j])[:, None]], 1
                )
                tv, tn, ts, keep = _clip_keep_positive(
                    tv, tn, ts, torch.as_tensor(coef), torch.full((hit.size,), j), tol
                )
                alive &= keep
            sv, sn, ss = tv.numpy(), tn.numpy(), ts.numpy()
            valid_c = np.arange(sv.shape[1])[None, :] < sn[:, None]
            nxt = (np.arange(sv.shape[1])[None, :] + 1) % sn[:, None]
            vn = np.take_along_axis(sv, nxt[..., None].repeat(2, 2), 1)
            tie = valid_c & (ss > i) & alive.numpy()[:, None]
            rr, cc = np.nonzero(tie)
            res["a"].append(sv[rr, cc])
            res["b"].append(vn[rr, cc])
            res["region"].append(hit[rr])
            res["ca"].append(np.full(rr.size, i))
            res["cb"].append(ss[rr, cc])
            res["lv"].append(np.full(rr.size, np.nan))
    out = {
        key: (np.concatenate(v) if v else np.zeros((0, 2) if key in "ab" else 0))
        for key, v in res.items()
    }
    return out


def _boundary_candidates(
    verts: Tensor,
    n: Tensor,
    amap: Tensor,
    cvec: Tensor,
    levels: list[float] | None,
    output: int,
    tol: float,
) -> Tensor:
    """A superset of the regions that the NumPy pass of :func:`boundary_segments` examines
    (its ``hit`` tests with a margin for rounding, all levels at once): the others hold
    no boundary segment."""
    vals = torch.einsum("pvd,pkd->pvk", verts, amap) + cvec[:, None, :]
    valid = torch.arange(verts.shape[1], device=verts.device)[None, :] < n[:, None]
    if levels is not None:
        hit = torch.zeros(len(n), dtype=torch.bool, device=verts.device)
        for level in levels:
            g = vals[..., output] - level
            margin = 1e-12 * (1 + vals[..., output].abs())
            hit |= ((g > -margin) & valid).any(1) & ((g < margin) & valid).any(1)
        return hit
    top = vals.argmax(2)
    mixed = ((top != top[:, :1]) & valid).any(1)
    srt = torch.sort(vals, dim=2).values
    gap = srt[..., -1] - srt[..., -2]
    near_tie = ((gap <= (2 * tol + 1e-12) * (1 + srt[..., -1].abs())) & valid).any(1)
    return mixed | near_tie


def _collect(
    res: dict[str, list[np.ndarray]],
    verts: np.ndarray,
    n: np.ndarray,
    hit: np.ndarray,
    coef: np.ndarray,
    label: np.ndarray,
    tol: float,
    pair: tuple[int, int],
    level: float,
) -> None:
    tv, tn, ts, keep = _clip_keep_positive(
        torch.as_tensor(verts),
        torch.as_tensor(n),
        torch.full(verts.shape[:2], -1),
        torch.as_tensor(coef),
        torch.as_tensor(label),
        tol,
    )
    sv, sn, ss = tv.numpy(), tn.numpy(), ts.numpy()
    valid = np.arange(sv.shape[1])[None, :] < sn[:, None]
    nxt = (np.arange(sv.shape[1])[None, :] + 1) % sn[:, None]
    vn = np.take_along_axis(sv, nxt[..., None].repeat(2, 2), 1)
    rr, cc = np.nonzero(valid & (ss == 1) & keep.numpy()[:, None])
    res["a"].append(sv[rr, cc])
    res["b"].append(vn[rr, cc])
    res["region"].append(hit[rr])
    res["ca"].append(np.full(rr.size, pair[0]))
    res["cb"].append(np.full(rr.size, pair[1]))
    res["lv"].append(np.full(rr.size, level))


def table_regions(
    geometry: pa.Array,
    area: np.ndarray,
    cen: np.ndarray,
    n: np.ndarray,
    pattern: pa.Array,
    amap: np.ndarray,
    cvec: np.ndarray,
    label: np.ndarray,
    slope_norm: np.ndarray,
) -> pa.Table:
    p, k = cvec.shape
    return pa.table(
        {
            "region_id": pa.array(np.arange(p, dtype=np.int64)),
            "geometry": geometry,
            "area": pa.array(area),
            "centroid_u0": pa.array(cen[:, 0]),
            "centroid_u1": pa.array(cen[:, 1]),
            "n_vertices": pa.array(n.astype(np.int32)),
            "pattern": pattern,
            "A": pa.FixedSizeListArray.from_arrays(pa.array(amap.reshape(-1)), 2 * k),
            "c": pa.FixedSizeListArray.from_arrays(pa.array(cvec.reshape(-1)), k),
            "label": pa.array(label.astype(np.int32)),
            "slope_norm": pa.array(slope_norm),
        }
    )


def table_segments(a: Any, b: Any, cols: dict[str, Any]) -> pa.Table:
    """Segments from ``a`` to ``b`` (S, 2) with their extra columns (negative integers
    and NaN become null); tensors are encoded on their device, then copied in few blocks:
    the coordinates and lengths as one matrix, the tensor columns of each dtype as one."""
    a_t = torch.as_tensor(a, dtype=torch.float64)
    b_t = torch.as_tensor(b, dtype=torch.float64).to(a_t.device)
    ab = torch.cat([a_t, b_t], 1)  # (S, 4): u0_a, u1_a, u0_b, u1_b
    d = b_t - a_t
    num = to_host(torch.cat([ab, torch.sqrt((d * d).sum(1, keepdim=True))], 1))
    data: dict[str, pa.Array] = {"geometry": segments_wkb(ab)}
    for i, key in enumerate(("u0_a", "u1_a", "u0_b", "u1_b", "length")):
        data[key] = pa.array(num[:, i])
    host: dict[str, np.ndarray] = {}
    for dtype in {v.dtype for v in cols.values() if isinstance(v, Tensor)}:
        keys = [k for k, v in cols.items() if isinstance(v, Tensor) and v.dtype == dtype]
        block = to_host(torch.stack([cols[k] for k in keys]))
        host.update(zip(keys, block))
    for key, val in cols.items():
        arr = host[key] if key in host else np.asarray(val)
        if arr.dtype.kind == "i":
            data[key] = pa.array(arr, mask=arr < 0)
        else:
            data[key] = pa.array(arr, mask=np.isnan(arr))  # "not applicable" is null
    return pa.table(data)
