"""Checks that prove a partition exact (design.md section 3), runnable on any partition."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
import torch

from geomstore.errors import GeomstoreError

__all__ = ["Check", "VerifyReport", "verify"]


@dataclass
class Check:
    """One check's outcome."""

    name: str
    passed: bool
    detail: str


@dataclass
class VerifyReport:
    """All checks run on a partition; ``ok`` when every one passed."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    def raise_if_failed(self) -> None:
        bad = [c for c in self.checks if not c.passed]
        if bad:
            raise GeomstoreError(
                "partition failed verification: " + "; ".join(f"{c.name}: {c.detail}" for c in bad)
            )

    def __str__(self) -> str:
        return "\n".join(
            f"[{'ok' if c.passed else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks
        )


def _model_states(program: Any, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's own output, unit states and state margins on inputs x."""
    with torch.no_grad():
        out, pres = program.forward_with_pre(x)
    st, mg = [], []
    for spec, pre in zip(program.nonlinearities, pres, strict=True):
        st.append(spec.states_from_values(pre).cpu().numpy())
        scale = 1.0 + pre.reshape(pre.shape[0], -1).abs().amax(1, keepdim=True)
        mg.append((spec.margins(pre) / scale).cpu().numpy())
    n = x.shape[0]
    states = np.concatenate(st, 1) if st else np.zeros((n, 0), np.uint8)
    margins = np.concatenate(mg, 1) if mg else np.zeros((n, 0))
    return out.cpu().numpy(), states, margins


def verify(
    partition: Any,
    model: Any = None,
    *,
    grid: int = 96,
    brute_force: bool = True,
    amb: float = 1e-8,
) -> VerifyReport:
    """Check a partition: tiling, affine maps, activation patterns, boundary, region count.

    Parameters
    ----------
    partition : Partition
    model : torch.nn.Module, optional
        Needed for check 5 (the brute-force region count of plain ReLU MLPs).
    grid : int
        Points per side of the dense grid of check 3.
    amb : float
        Units whose pre-activation lies within ``amb`` (relative) of a state change at a
        test point are ambiguous there and not compared.

    Examples
    --------
    >>> import torch
    >>> from geomstore import Slice, partition
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> partition(net, Slice.box((-1, -1), (1, 1)), device="cpu").verify(net).ok
    True
    """
    from geomstore.engine.reference import is_plain_relu_mlp, reference_regions

    program = partition.program
    if program is None:
        raise GeomstoreError("this partition has no program attached; recompute it to verify.")
    sl = partition.slice
    dev = program.device
    report = VerifyReport()
    polys = partition.polygons()
    area = np.asarray(partition.regions.column("area"))
    total = float(area.sum())
    # 1. tiling
    tree = shapely.STRtree(polys)
    g = np.linspace(0.0, 1.0, grid + 2)[1:-1]
    lo, hi = sl.domain.min(0), sl.domain.max(0)
    gu = np.stack(np.meshgrid(lo[0] + g * (hi[0] - lo[0]), lo[1] + g * (hi[1] - lo[1])), -1)
    gu = gu.reshape(-1, 2)
    inside = shapely.contains_xy(shapely.Polygon(sl.domain), gu[:, 0], gu[:, 1])
    gu = gu[inside]
    pts = shapely.points(gu)
    cover = np.bincount(tree.query(pts, predicate="intersects")[0], minlength=len(gu))
    pin, reg = tree.query(pts, predicate="within")
    strict = np.bincount(pin, minlength=len(gu))
    area_ok = abs(total - sl.area) <= 1e-9 * sl.area
    nonneg = bool((area > 0).all())
    report.checks.append(
        Check(
            "tiling",
            area_ok and nonneg and bool((cover >= 1).all()) and bool((strict <= 1).all()),
            f"area sum {total:.15g} vs domain {sl.area:.15g}; "
            f"{int((cover == 0).sum())} grid points "
            f"uncovered, {int((strict > 1).sum())} inside two regions, {int((area <= 0).sum())} "
            "regions without area",
        )
    )
    # 2. affine maps and patterns at centroids
    amap, cvec = partition.affine_maps()
    cen = np.stack(
        [
            np.asarray(partition.regions.column("centroid_u0")),
            np.asarray(partition.regions.column("centroid_u1")),
        ],
        1,
    )
    x = torch.as_tensor(sl.lift(cen, shaped=True), device=dev)
    out, states, margins = _model_states(program, x)
    pred = np.einsum("pkd,pd->pk", amap, cen) + cvec
    scale = 1.0 + np.abs(out).max() + np.abs(amap).max() * sl.diameter
    err = float(np.abs(out - pred).max()) if len(out) else 0.0
    report.checks.append(
        Check("affine maps", err <= 1e-9 * scale, f"max |model - A u - c| at centroids {err:.3g}")
    )
    mism = (states != partition.states) & (margins > amb)
    report.checks.append(
        Check(
            "patterns at centroids",
            not bool(mism.any()),
            f"{int(mism.any(1).sum())} of {len(cen)} regions disagree",
        )
    )
    # 3. dense grid
    first = np.full(len(gu), -1)
    first[pin] = reg
    has = first >= 0
    xg = torch.as_tensor(sl.lift(gu[has], shaped=True), device=dev)
    _, gst, gmg = _model_states(program, xg)
    gm = (gst != partition.states[first[has]]) & (gmg > amb)
    report.checks.append(
        Check(
            "patterns on grid",
            not bool(gm.any()),
            f"{int(gm.any(1).sum())} of {int(has.sum())} grid points disagree",
        )
    )
    # 4. decision boundary
    bd = partition.boundary
    if bd.num_rows:
        mid = 0.5 * (
            np.stack([np.asarray(bd.column("u0_a")), np.asarray(bd.column("u1_a"))], 1)
            + np.stack([np.asarray(bd.column("u0_b")), np.asarray(bd.column("u1_b"))], 1)
        )
        xb = torch.as_tensor(sl.lift(mid, shaped=True), device=dev)
        with torch.no_grad():
            ob = program.forward_with_pre(xb)[0].cpu().numpy()
        ca, cb = np.asarray(bd.column("class_a")), np.asarray(bd.column("class_b"))
        lvl = np.asarray(bd.column("level"))
        btol = 1e-9 * (1.0 + np.abs(ob).max())
        if partition.settings["boundary_kind"] == "top2":
            r = np.arange(len(ob))
            va, vb = ob[r, ca], ob[r, cb]
            others = ob.copy()
            others[r, ca] = -np.inf
            others[r, cb] = -np.inf
            worst = np.maximum(np.abs(va - vb), others.max(1) - np.minimum(va, vb))
            if ob.shape[1] == 2:
                worst = np.abs(va - vb)
        else:
            worst = np.abs(ob[np.arange(len(ob)), ca] - lvl)
        report.checks.append(
            Check(
                "decision boundary",
                float(worst.max()) <= btol,
                f"worst tie violation {float(worst.max()):.3g} on {bd.num_rows} segments",
            )
        )
    # 5. independent count
    if brute_force and model is not None and is_plain_relu_mlp(model) and sl.dim == 2:
        ref = reference_regions(model, sl)
        report.checks.append(
            Check(
                "brute-force count",
                len(ref) == partition.n_regions,
                f"{partition.n_regions} regions, reference {len(ref)}",
            )
        )
    return report
