"""Checks that prove a partition exact (design.md section 3), runnable on any partition."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
import torch

from geomstore._aliases import renamed_kwargs
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


def model_states(
    program: Any, x: torch.Tensor, *, block: int = 1 << 24
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's own output, unit states and state margins on inputs x (in row blocks)."""
    rows = max(1, block // max(1, program.n_units))
    outs, sts, mgs = [], [], []
    for lo in range(0, max(1, x.shape[0]), rows):
        xb = x[lo : lo + rows]
        with torch.no_grad():
            out, pres = program.forward_with_pre(xb)
        st, mg = [], []
        for spec, pre in zip(program.nonlinearities, pres, strict=True):
            st.append(spec.states_from_values(pre).cpu().numpy())
            scale = 1.0 + pre.reshape(pre.shape[0], -1).abs().amax(1, keepdim=True)
            mg.append((spec.margins(pre) / scale).cpu().numpy())
        n = xb.shape[0]
        outs.append(out.cpu().numpy())
        sts.append(np.concatenate(st, 1) if st else np.zeros((n, 0), np.uint8))
        mgs.append(np.concatenate(mg, 1) if mg else np.zeros((n, 0)))
    return np.concatenate(outs), np.concatenate(sts), np.concatenate(mgs)


ONE_BY_ONE = 256
REF_MIN_AREA = 1e-14  # the brute-force reference's resolution, a share of the domain's area
"""Points checked against a model that takes one input at a time (an export program
traced for batch 1)."""


def _own_output(net: Any, program: Any, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The model's own forward at x, run on a float64 copy of it (not the lowered graph:
    a graph that no longer matches the model would agree with its own partition), and
    the rows of x it covers: all, or ``ONE_BY_ONE`` of them spread evenly for a model
    that refuses a batch."""
    from geomstore.engine.lower import _first, _source

    fn = _source(net)[0]
    held = [*fn.parameters(), *fn.buffers()] if isinstance(fn, torch.nn.Module) else []
    dev = held[0].device if held else torch.device("cpu")  # where the model is

    def run(xb: torch.Tensor) -> np.ndarray:
        return _first(fn(xb.to(dev))).detach().to(torch.float64).cpu().numpy()

    step = max(1, (1 << 24) // max(1, program.n_units))
    n = int(x.shape[0])
    rows = np.arange(n)
    with torch.no_grad():
        try:
            outs = [run(x[lo : lo + step]) for lo in range(0, n, step)]
        except Exception:  # batch 1 only: the tracing checks took batches of the graph
            rows = np.unique(np.linspace(0, n - 1, min(n, ONE_BY_ONE)).astype(int))
            outs = [run(x[i : i + 1]) for i in rows]
    return (np.concatenate(outs) if outs else np.zeros((0, program.n_outputs))), rows


def _stripped(program: Any, logits: np.ndarray) -> np.ndarray:
    """The model's output from the logits when a trailing softmax was stripped."""
    op = getattr(program.gm, "_gs_stripped_op", None)
    if not program.stripped_softmax or op is None:
        return logits
    t = torch.from_numpy(logits)
    f = torch.log_softmax if "log_softmax" in op[0] else torch.softmax
    return f(t, dim=int(op[1])).numpy()


def _blockwise(
    program: Any,
    partition: Any,
    x: torch.Tensor,
    rid: np.ndarray,
    check: np.ndarray,
    amb: float,
    *,
    block: int = 1 << 24,
) -> tuple[np.ndarray, np.ndarray]:
    """Outputs at x, and which checked rows disagree with their region's pattern.

    Row blocks keep memory bounded: a ResNet's states and margins for every test point at
    once would be tens of gigabytes.
    """
    rows = max(1, block // max(1, program.n_units))
    outs, bad = [], []
    for lo in range(0, max(1, x.shape[0]), rows):
        out, st, mg = model_states(program, x[lo : lo + rows], block=block)
        c = check[lo : lo + rows]
        b = np.zeros(len(c), dtype=bool)
        if c.any():
            b[c] = _pattern_mismatch(partition, program, rid[lo : lo + rows][c], st[c], mg[c], amb)
        outs.append(out)
        bad.append(b)
    return np.concatenate(outs), np.concatenate(bad)


def _pattern_mismatch(
    partition: Any,
    program: Any,
    regions: np.ndarray,
    states: np.ndarray,
    margins: np.ndarray,
    amb: float,
) -> np.ndarray:
    """Points whose unambiguous states differ from their region's (whole or hashed) pattern."""
    if partition.states is not None:
        return ((states != partition.states[regions]) & (margins > amb)).any(1)
    from geomstore.engine.patterns import PatternHash

    got = PatternHash(program.n_units).of(torch.from_numpy(states)).numpy()
    clear = (margins > amb).all(1)  # a hash compares whole patterns: skip ambiguous points
    return clear & (got != partition.pattern_hashes()[regions]).any(1)


@renamed_kwargs(model="net")
def verify(
    partition: Any,
    net: Any = None,
    *,
    grid: int = 96,
    brute_force: bool = True,
    amb: float = 1e-8,
    points: int = 2,
) -> VerifyReport:
    """Check a partition: tiling, affine maps, activation patterns, boundary, region count.

    Parameters
    ----------
    partition : Partition
    net : torch.nn.Module, optional
        Needed for check 5 (the brute-force region count of plain ReLU MLPs), and for a
        partition loaded from a store (its weights must be the ones it was computed with).
    grid : int
        Points per side of the dense grid of check 3.
    amb : float
        Units whose pre-activation lies within ``amb`` (relative) of a state change at a
        test point are ambiguous there and not compared.
    points : int
        Random interior points per region (besides the centroid) at which the model's
        output must equal the region's affine map.

    Examples
    --------
    >>> import torch
    >>> from geomstore import Slice, partition
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> partition(net, Slice.box((-1, -1), (1, 1)), device="cpu").verify(net).ok
    True
    """
    from geomstore.engine.reference import is_plain_relu_mlp

    if partition.program is None and net is None:
        raise GeomstoreError(
            "this partition has no network attached (it was loaded from a store); pass "
            "net= (the checkpoint's network) to verify it."
        )
    program = partition.program_for(net)
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
    # grid points on the domain's border (to rounding) belong to no region's interior
    inner = shapely.Polygon(sl.domain).buffer(-1e-9 * sl.diameter)
    inside = shapely.contains_xy(inner, gu[:, 0], gu[:, 1])
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
    # 2. affine maps at centroids and random interior points; patterns at centroids
    amap, cvec = partition.affine_maps()
    cen = np.stack(
        [
            np.asarray(partition.regions.column("centroid_u0")),
            np.asarray(partition.regions.column("centroid_u1")),
        ],
        1,
    )
    from geomstore.engine.partition import _interior_points

    rng = np.random.default_rng(0)
    extra = _interior_points(polys, rng, points) if points else []
    uu = np.concatenate([cen, *extra]) if extra else cen
    rid = np.tile(np.arange(len(cen)), 1 + len(extra))
    x = torch.as_tensor(sl.lift(uu, shaped=True), device=dev)
    n = len(cen)
    out, bad = _blockwise(program, partition, x, rid, np.arange(len(rid)) < n, amb)
    pred = np.einsum("pkd,pd->pk", amap[rid], uu) + cvec[rid]
    scale = 1.0 + np.abs(out).max() + np.abs(amap).max() * sl.diameter if len(out) else 1.0
    err = float(np.abs(out - pred).max()) if len(out) else 0.0
    report.checks.append(
        Check(
            "affine maps",
            err <= 1e-9 * scale,
            f"max |model - A u - c| at centroids and {points} random interior points per "
            f"region {err:.3g}",
        )
    )
    if net is not None:
        own, rows = _own_output(net, program, x)
        want = _stripped(program, pred)[rows]
        err_own = float(np.abs(own - want).max()) if len(own) else 0.0
        report.checks.append(
            Check(
                "model's own output",
                err_own <= 1e-5 * scale,
                f"max |net(x) - A u - c| at the same points {err_own:.3g}, the model given "
                "run itself (a float64 copy), not its lowered graph (within 1e-5 of the "
                "output's scale: constants a forward makes in float32 differ in their digits)",
            )
        )
    mism = bad[:n]
    report.checks.append(
        Check(
            "patterns at centroids",
            not bool(mism.any()),
            f"{int(mism.sum())} of {len(cen)} regions disagree",
        )
    )
    # 3. dense grid
    first = np.full(len(gu), -1)
    first[pin] = reg
    has = first >= 0
    xg = torch.as_tensor(sl.lift(gu[has], shaped=True), device=dev)
    rg = first[has]
    _, gm = _blockwise(program, partition, xg, rg, np.ones(len(rg), dtype=bool), amb)
    report.checks.append(
        Check(
            "patterns on grid",
            not bool(gm.any()),
            f"{int(gm.sum())} of {int(has.sum())} grid points disagree",
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
    if brute_force and net is not None and is_plain_relu_mlp(net) and sl.dim == 2:
        report.checks.append(_brute_force_check(partition, net, sl))
    return report


def _brute_force_check(partition: Any, net: Any, sl: Any) -> Check:
    """Check 5: the regions against :func:`reference_regions`, pattern by pattern.

    The reference drops pieces below its resolution (area ``REF_MIN_AREA`` of the
    domain's); regions of the partition that small may be missing there (lines that
    nearly meet in one point make real regions of that size), larger ones may not.
    """
    from geomstore.engine.reference import reference_regions

    ref = reference_regions(net, sl, min_area=REF_MIN_AREA)
    ours = partition.patterns(net=net)
    theirs = {bytes(np.asarray(p, np.uint8)) for _, p in ref}
    mine = [bytes(np.asarray(row, np.uint8)) for row in ours]
    area = np.asarray(partition.regions.column("area"), dtype=np.float64)
    tiny = area <= 10 * REF_MIN_AREA * sl.area
    extra = [i for i, key in enumerate(mine) if key not in theirs]
    missing = len(theirs - set(mine))
    twice = len(mine) - len(set(mine))  # a plain ReLU MLP's pattern holds on one convex cell
    ok = missing == 0 and twice == 0 and all(tiny[i] for i in extra)
    detail = f"{partition.n_regions} regions, reference {len(ref)}"
    if twice:
        detail += f"; {twice} patterns on more than one region"
    if extra or missing:
        small = sum(bool(tiny[i]) for i in extra)
        detail += (
            f"; {missing} reference patterns missing here, {len(extra)} patterns not in the"
            f" reference ({small} of them below its resolution, area <="
            f" {10 * REF_MIN_AREA:g} of the domain's)"
        )
    return Check("brute-force count", ok, detail)
