"""From raw regions to the three Arrow tables: regions, edges and boundary."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from geomstore.engine.split import clip_both, pad_polys
from geomstore.engine.wkb import polygons_wkb, segments_wkb

__all__ = ["boundary_segments", "edge_overlay", "polygon_measures"]


def _sides(verts: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ar = np.arange(verts.shape[1])
    valid = ar[None, :] < n[:, None]
    nxt = (ar[None, :] + 1) % n[:, None]
    vn = np.take_along_axis(verts, nxt[..., None].repeat(2, 2), 1)
    return valid, vn, nxt


def polygon_measures(verts: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Areas (P,) and centroids (P, 2) of padded CCW polygons (shoelace, centred per polygon)."""
    valid, _, nxt = _sides(verts, n)
    base = verts[:, :1, :]
    rel = np.where(valid[..., None], verts - base, 0.0)
    reln = np.take_along_axis(rel, nxt[..., None].repeat(2, 2), 1)
    cross = (rel[..., 0] * reln[..., 1] - reln[..., 0] * rel[..., 1]) * valid
    area = 0.5 * cross.sum(1)
    safe = np.where(area > 0, area, 1.0)
    cx = ((rel[..., 0] + reln[..., 0]) * cross).sum(1) / (6 * safe)
    cy = ((rel[..., 1] + reln[..., 1]) * cross).sum(1) / (6 * safe)
    mean = rel.sum(1) / n[:, None]
    cen = np.where((area > 0)[:, None], np.stack([cx, cy], 1), mean) + base[:, 0, :]
    return area, cen


def edge_overlay(
    verts: np.ndarray,
    n: np.ndarray,
    side: np.ndarray,
    cut_units: np.ndarray,
    cut_dirs: np.ndarray,
    min_length: float,
) -> dict[str, np.ndarray]:
    """Every boundary segment once, with the regions on both sides.

    Both children of a cut carry the cut's chord as a side; later cuts subdivide either
    copy independently. Overlaying the two subdivisions of each chord gives the maximal
    segments shared by exactly two regions.
    """
    valid, vn, _ = _sides(verts, n)
    reg = np.broadcast_to(np.arange(len(n))[:, None], valid.shape)[valid]
    a, b, lab = verts[valid], vn[valid], side[valid]
    border = lab < 0
    out_a = [a[border]]
    out_b = [b[border]]
    left = [reg[border]]
    right = [np.full(int(border.sum()), -1)]
    unit = [np.full(int(border.sum()), -1)]
    bidx = [-(lab[border] + 1)]
    m = ~border
    c, a, b, reg = lab[m], a[m], b[m], reg[m]
    if c.size:
        d = cut_dirs[c]
        nrm = np.stack([-d[:, 1], d[:, 0]], 1)
        t0 = (a * d).sum(1)
        t1 = (b * d).sum(1)
        s = (a * nrm).sum(1)
        grp = (t1 < t0).astype(np.int64)
        lo, hi = np.minimum(t0, t1), np.maximum(t0, t1)
        # One sort of all pieces by (chord, start). Each start opens an elementary
        # interval that runs to the next start on the same chord (or the chord's end);
        # the piece of each side covering it is the last of that side started so far.
        o = np.lexsort((grp, lo, c))
        sc, slo, sgrp = c[o], lo[o], grp[o]
        k = o.size
        pos = np.arange(k)
        new_chord = np.ones(k, dtype=bool)
        new_chord[1:] = sc[1:] != sc[:-1]
        chord_start = np.maximum.accumulate(np.where(new_chord, pos, 0))
        owner = []
        for g in (0, 1):
            last = np.maximum.accumulate(np.where(sgrp == g, pos, -1))
            ok = last >= chord_start
            owner.append(np.where(ok, o[np.maximum(last, 0)], -1))
        nxt_lo = np.empty(k)
        nxt_lo[:-1] = slo[1:]
        end = np.ones(k, dtype=bool)
        end[:-1] = new_chord[1:]
        # the chord's end: the largest end point of its pieces
        chord_id = np.cumsum(new_chord) - 1
        chord_hi = np.full(int(chord_id[-1]) + 1 if k else 0, -np.inf)
        np.maximum.at(chord_hi, chord_id, hi[o])
        nxt_lo[end] = chord_hi[chord_id[end]]
        keep = nxt_lo - slo > min_length
        ic, ilo, ihi = sc[keep], slo[keep], nxt_lo[keep]
        owner = [w[keep] for w in owner]
        p0, p1 = owner
        chord_s = np.where(p0 >= 0, s[np.maximum(p0, 0)], s[np.maximum(p1, 0)])
        dd = cut_dirs[ic]
        nn_ = np.stack([-dd[:, 1], dd[:, 0]], 1)
        pa_ = ilo[:, None] * dd + chord_s[:, None] * nn_
        pb_ = ihi[:, None] * dd + chord_s[:, None] * nn_
        out_a.append(pa_)
        out_b.append(pb_)
        left.append(np.where(p0 >= 0, reg[np.maximum(p0, 0)], -1))
        right.append(np.where(p1 >= 0, reg[np.maximum(p1, 0)], -1))
        unit.append(cut_units[ic])
        bidx.append(np.full(ic.size, -1))
    return {
        "a": np.concatenate(out_a),
        "b": np.concatenate(out_b),
        "left": np.concatenate(left),
        "right": np.concatenate(right),
        "unit": np.concatenate(unit),
        "border": np.concatenate(bidx),
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
    tau = tol * torch.sqrt(a[:, 0] * a[:, 0] + a[:, 1] * a[:, 1])
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
    verts: np.ndarray,
    n: np.ndarray,
    amap: np.ndarray,
    cvec: np.ndarray,
    *,
    levels: list[float] | None,
    output: int,
    tol: float,
) -> dict[str, np.ndarray]:
    """Decision-boundary segments inside every region.

    ``amap`` (P, K, 2) and ``cvec`` (P, K) are the regions' affine maps in the same
    coordinates as ``verts``. With ``levels`` None and K >= 2, returns where the top two
    outputs tie (class pair a < b); otherwise the level sets of output ``output``.
    """
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
    verts: np.ndarray,
    n: np.ndarray,
    area: np.ndarray,
    cen: np.ndarray,
    pattern: pa.Array,
    amap: np.ndarray,
    cvec: np.ndarray,
    label: np.ndarray,
) -> pa.Table:
    p, k = cvec.shape
    return pa.table(
        {
            "region_id": pa.array(np.arange(p, dtype=np.int64)),
            "geometry": polygons_wkb(verts, n),
            "area": pa.array(area),
            "centroid_u0": pa.array(cen[:, 0]),
            "centroid_u1": pa.array(cen[:, 1]),
            "n_vertices": pa.array(n.astype(np.int32)),
            "pattern": pattern,
            "A": pa.FixedSizeListArray.from_arrays(pa.array(amap.reshape(-1)), 2 * k),
            "c": pa.FixedSizeListArray.from_arrays(pa.array(cvec.reshape(-1)), k),
            "label": pa.array(label.astype(np.int32)),
            "slope_norm": pa.array(np.sqrt((amap**2).sum(axis=(1, 2)))),
        }
    )


def table_segments(a: np.ndarray, b: np.ndarray, cols: dict[str, np.ndarray]) -> pa.Table:
    data: dict[str, pa.Array] = {"geometry": segments_wkb(a, b)}
    data["u0_a"], data["u1_a"] = pa.array(a[:, 0]), pa.array(a[:, 1])
    data["u0_b"], data["u1_b"] = pa.array(b[:, 0]), pa.array(b[:, 1])
    data["length"] = pa.array(np.linalg.norm(b - a, axis=1))
    for key, val in cols.items():
        if val.dtype.kind == "i":
            data[key] = pa.array(val, mask=val < 0)
        else:
            data[key] = pa.array(val, mask=np.isnan(val))  # "not applicable" is null
    return pa.table(data)
