"""Pictures: a partition, a checkpoint series (GIF, small multiples), curves over training.

Regions are filled by slope norm, predicted class or local complexity; edges are thin, the
decision boundary bold, data points on top; axes are slice coordinates. The format
follows the file name (``.png``, ``.svg``, ``.pdf``; ``.gif`` for animations).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from geomstore.engine.partition import Partition
from geomstore.errors import GeomstoreError

__all__ = ["animate", "draw_partition", "plot_trajectory", "region_lc", "small_multiples"]

COLORINGS = ("slope", "class", "lc")


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GeomstoreError("pictures need matplotlib: pip install matplotlib") from None
    return plt


def region_lc(part: Partition, radius: float | None = None) -> np.ndarray:
    """Per region: distinct neurons whose edges pass within ``radius`` of its centroid.

    The default radius is 2% of the slice's diameter.
    """
    import shapely

    r = 0.02 * part.slice.diameter if radius is None else float(radius)
    e = part.edges
    layer = np.asarray(e.column("layer").fill_null(-1))
    keep = layer >= 0
    unit = np.asarray(e.column("unit").fill_null(-1))[keep]
    segs = shapely.linestrings(
        np.stack(
            [
                np.stack([np.asarray(e.column("u0_a")), np.asarray(e.column("u1_a"))], 1),
                np.stack([np.asarray(e.column("u0_b")), np.asarray(e.column("u1_b"))], 1),
            ],
            1,
        )[keep]
    )
    cx = np.asarray(part.regions.column("centroid_u0"))
    cy = np.asarray(part.regions.column("centroid_u1"))
    tree = shapely.STRtree(segs)
    reg, seg = tree.query(shapely.points(cx, cy), predicate="dwithin", distance=r)
    pairs = np.unique(reg.astype(np.int64) * (int(unit.max(initial=0)) + 1) + unit[seg])
    return np.bincount(pairs // (int(unit.max(initial=0)) + 1), minlength=len(cx))


def class_pieces(part: Partition) -> tuple[list[np.ndarray], np.ndarray]:
    """The regions cut along the decision boundary: (polygon rings, predicted class).

    A region's centroid label is not the class of the whole region: the boundary runs
    through regions. Each region is split into the cells where each class wins (top-1 of
    the region's affine map; for one output, above / below the threshold).
    """
    import shapely

    kind = part.settings.get("boundary_kind")
    amap, cvec = part.affine_maps()
    polys = part.polygons()
    if kind == "top2":
        from geomstore.queries.fragmentation import class_cells

        cells, _ = class_cells(part)
        pieces = [(c, np.full(len(c), k)) for k, c in enumerate(cells)]
    elif kind == "threshold":
        t = float(part.settings.get("threshold") or 0.0)
        a, b = amap[:, 0, :], cvec[:, 0] - t
        norm = np.linalg.norm(a, axis=1)
        big = 4.0 * part.slice.diameter + float(np.abs(part.slice.domain).max())
        nrm = a / np.where(norm > 0, norm, 1.0)[:, None]
        d = np.stack([-nrm[:, 1], nrm[:, 0]], 1)
        ctr = part.slice.domain.mean(0)
        p0 = ctr - ((nrm @ ctr) + b / np.where(norm > 0, norm, 1.0))[:, None] * nrm
        quads = shapely.polygons(
            np.stack(
                [p0 - big * d, p0 + big * d, p0 + big * d + big * nrm, p0 - big * d + big * nrm], 1
            )
        )
        flat = norm == 0
        up = np.where(
            flat, np.where(b > 0, polys, shapely.Polygon()), shapely.intersection(polys, quads)
        )
        down = np.where(
            flat, np.where(b > 0, shapely.Polygon(), polys), shapely.difference(polys, quads)
        )
        pieces = [(down, np.zeros(len(polys), int)), (up, np.ones(len(polys), int))]
    else:  # level sets of a regression output: the centroid's label
        return [np.asarray(shapely.get_exterior_ring(p).coords) for p in polys], np.asarray(
            part.regions.column("label")
        )
    rings, labels = [], []
    for geoms, lab in pieces:
        parts, owner = shapely.get_parts(geoms, return_index=True)
        for g, k in zip(parts, lab[owner]):
            if isinstance(g, shapely.Polygon) and not g.is_empty and g.area > 0:
                rings.append(np.asarray(g.exterior.coords))
                labels.append(k)
    return rings, np.asarray(labels)


_STYLE = {
    "slope": ("viridis", "slope norm ||A||_F"),
    "class": ("tab10", "predicted class"),
    "lc": ("magma", "local complexity (neurons near)"),
}
Coloured = tuple[list[np.ndarray], np.ndarray]  # polygon rings and the value of each


def _style(color: str) -> tuple[str, str]:
    """Colour map and colour-bar label of a colouring."""
    if color not in _STYLE:
        raise GeomstoreError(f"color must be one of {', '.join(COLORINGS)}; got {color!r}.")
    return _STYLE[color]


def _colours(part: Partition, color: str, radius: float | None) -> Coloured:
    """The polygons to fill and their values (class colouring cuts regions into class cells)."""
    import shapely

    _style(color)
    if color == "class":
        return class_pieces(part)
    rings = [np.asarray(shapely.get_exterior_ring(p).coords) for p in part.polygons()]
    if color == "slope":
        return rings, np.asarray(part.regions.column("slope_norm"))
    return rings, region_lc(part, radius).astype(float)


def _aspect(part: Partition) -> float:
    span = np.ptp(part.slice.domain, axis=0)
    return float(np.clip(span[1] / span[0], 0.3, 3.0))


def _segments(t: pa.Table) -> np.ndarray:
    a = np.stack([np.asarray(t.column("u0_a")), np.asarray(t.column("u1_a"))], 1)
    b = np.stack([np.asarray(t.column("u0_b")), np.asarray(t.column("u1_b"))], 1)
    return np.stack([a, b], 1)


def _draw(
    ax: Any,
    part: Partition,
    coloured: Coloured,
    *,
    color: str,
    points: tuple[np.ndarray, np.ndarray | None] | None,
    vrange: tuple[float, float] | None,
    title: str | None,
) -> Any:
    from matplotlib.collections import LineCollection, PolyCollection

    coords, vals = coloured
    pc = PolyCollection(coords, array=vals, cmap=_style(color)[0], edgecolors="none")
    if color == "class":
        from matplotlib.colors import ListedColormap

        k = max(2, int(part.model_summary.get("n_outputs", 2)))
        pc.set_cmap(ListedColormap(_plt().get_cmap("tab10").colors[: min(k, 10)]))
        pc.set_clim(-0.5, min(k, 10) - 0.5)
    else:  # a few very steep regions must not wash out the rest: clip at the 99th percentile
        pc.set_clim(*(vrange if vrange is not None else _robust_range([vals])))
    ax.add_collection(pc)
    edges = part.edges
    interior = np.asarray(edges.column("layer").fill_null(-1)) >= 0
    lw, alpha = (0.25, 0.7) if part.n_regions < 3000 else (0.1, 0.5)
    if part.n_regions > 20000:
        lw, alpha = 0.05, 0.35
    ax.add_collection(
        LineCollection(list(_segments(edges)[interior]), colors="white", linewidths=lw, alpha=alpha)
    )
    if part.boundary.num_rows:
        ax.add_collection(
            LineCollection(list(_segments(part.boundary)), colors="red", linewidths=1.8)
        )
    if points is not None:
        xy, lab = points
        ax.scatter(
            xy[:, 0],
            xy[:, 1],
            c="black" if lab is None else lab,
            s=5 if len(xy) > 50 else 40,
            cmap="coolwarm",
            edgecolors="white" if len(xy) > 50 else "black",
            linewidths=0.2 if len(xy) > 50 else 1.0,
            zorder=3,
        )
    dom = part.slice.domain
    lo, hi = dom.min(0), dom.max(0)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")
    ax.set_xlabel("u0")
    ax.set_ylabel("u1")
    ax.set_title(title if title is not None else f"{part.n_regions} regions", fontsize=9)
    return pc


def check_image_path(path: str | Path, *, animation: bool = False) -> Path:
    """``path`` as a Path, refused unless its suffix names a format that can be written:
    one of matplotlib's (.png, .svg, .pdf, ...) for a picture, .gif for an animation.

    >>> check_image_path("out/p.svg").suffix
    '.svg'
    """
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    formats = ["gif"] if animation else sorted(FigureCanvasBase.get_supported_filetypes())
    if suffix not in formats:
        what = "an animation" if animation else "a picture"
        raise GeomstoreError(
            f"{path}: cannot write {what} as {path.suffix or 'a file without a suffix'}; "
            f"give a name ending in one of {', '.join('.' + f for f in formats)}."
        )
    return path


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _plt().close(fig)
    return path


def draw_partition(
    part: Partition,
    path: str | Path,
    *,
    color: str = "slope",
    radius: float | None = None,
    points: tuple[np.ndarray, np.ndarray | None] | None = None,
    title: str | None = None,
) -> Path:
    """Draw one partition to ``path`` (PNG, SVG or PDF by suffix).

    ``color``: "slope" (||A||_F), "class" (predicted label) or "lc" (:func:`region_lc`).
    ``points``: (xy in slice coordinates, labels or None), drawn on top.

    >>> import tempfile, torch, geomstore
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> part = geomstore.partition(net, geomstore.Slice.box((-1, -1), (1, 1)), device="cpu")
    >>> draw_partition(part, tempfile.mkdtemp() + "/p.svg", color="class").suffix
    '.svg'
    """
    path = check_image_path(path)
    plt = _plt()
    coloured = _colours(part, color, radius)
    fig, ax = plt.subplots(figsize=(6.6, 5.2 * _aspect(part) + 0.9), dpi=130, layout="constrained")
    pc = _draw(ax, part, coloured, color=color, points=points, vrange=None, title=title)
    extend = "neither" if color == "class" else "max"
    bar = fig.colorbar(pc, ax=ax, label=_style(color)[1], shrink=0.85, extend=extend)
    if color == "class":
        bar.set_ticks(range(max(2, int(part.model_summary.get("n_outputs", 2)))))
    return _save(fig, Path(path))


def _robust_range(values: Sequence[np.ndarray]) -> tuple[float, float]:
    v = np.concatenate([np.asarray(x, dtype=float) for x in values])
    lo, hi = float(v.min()), float(np.quantile(v, 0.99))
    return lo, hi if hi > lo else lo + 1.0


def small_multiples(
    parts: Sequence[Partition],
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    color: str = "slope",
    radius: float | None = None,
    ncols: int = 4,
    points: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> Path:
    """A grid of partitions (one per checkpoint) with one shared colour scale."""
    if not parts:
        raise GeomstoreError("no partitions to draw.")
    path = check_image_path(path)
    plt = _plt()
    ncols = min(ncols, len(parts))
    nrows = -(-len(parts) // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(3.0 * ncols + 1.2, 3.0 * _aspect(parts[0]) * nrows + 0.5),
        dpi=110,
        layout="constrained",
        squeeze=False,
    )
    axes = np.atleast_1d(axes).reshape(-1)
    coloured = [_colours(p, color, radius) for p in parts]
    vr = _robust_range([c[1] for c in coloured])
    pc = None
    for i, part in enumerate(parts):
        t = titles[i] if titles else None
        pc = _draw(axes[i], part, coloured[i], color=color, points=points, vrange=vr, title=t)
        axes[i].set_xlabel("")
        axes[i].set_ylabel("")
    for ax in axes[len(parts) :]:
        ax.axis("off")
    fig.colorbar(pc, ax=list(axes), label=_style(color)[1], shrink=0.8)
    return _save(fig, Path(path))


def animate(
    parts: Sequence[Partition],
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    color: str = "slope",
    radius: float | None = None,
    fps: int = 4,
    points: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> Path:
    """A GIF, one frame per partition, with one shared colour scale."""
    if not parts:
        raise GeomstoreError("no partitions to animate.")
    path = check_image_path(path, animation=True)
    plt = _plt()
    from matplotlib.animation import FuncAnimation, PillowWriter

    fig, ax = plt.subplots(
        figsize=(6.0, 6.0 * _aspect(parts[0]) + 0.9), dpi=90, layout="constrained"
    )
    coloured = [_colours(p, color, radius) for p in parts]
    vr = _robust_range([c[1] for c in coloured])

    def frame(i: int) -> list[Any]:
        ax.clear()
        t = titles[i] if titles else None
        return [_draw(ax, parts[i], coloured[i], color=color, points=points, vrange=vr, title=t)]

    anim = FuncAnimation(fig, frame, frames=len(parts), blit=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    anim.save(str(path), writer=PillowWriter(fps=fps))
    plt.close(fig)
    return path


def plot_trajectory(
    curve: pa.Table,
    stats: pa.Table | None,
    path: str | Path,
    *,
    metrics: Sequence[str] | None = None,
) -> Path:
    """Local complexity (mean and quartiles per split), region count and boundary length,
    and accuracy, against the training step.

    ``metrics`` names the recorded metrics of the last panel; by default every one whose
    name holds "acc" (``accuracy``, ``train_acc``, ``val_acc``, ...), else all of them."""
    import json

    path = check_image_path(path)
    plt = _plt()
    panels = 3 if stats is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), dpi=120)
    steps = np.asarray(curve.column("step").fill_null(-1))
    splits = curve.column("split").to_pylist() if "split" in curve.column_names else None
    ax = axes[0]
    for split in sorted({s for s in splits or [None]}, key=str):
        m = np.array([s == split for s in splits]) if splits else np.ones(len(steps), bool)
        o = np.argsort(steps[m])
        x = steps[m][o]
        ax.plot(x, np.asarray(curve.column("lc_mean"))[m][o], label=str(split or "points"))
        ax.fill_between(
            x,
            np.asarray(curve.column("lc_q25"))[m][o],
            np.asarray(curve.column("lc_q75"))[m][o],
            alpha=0.2,
        )
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("local complexity (neurons)")
    ax.set_title("local complexity near the data", fontsize=9)
    ax.legend(fontsize=7)
    if stats is not None:
        s_steps = np.asarray(stats.column("step").fill_null(-1))
        o = np.argsort(s_steps)
        axes[1].plot(s_steps[o], np.asarray(stats.column("n_regions"))[o], color="tab:purple")
        axes[1].set_ylabel("regions", color="tab:purple")
        tw = axes[1].twinx()
        tw.plot(s_steps[o], np.asarray(stats.column("boundary_length"))[o], color="tab:red")
        tw.set_ylabel("decision-boundary length", color="tab:red")
        axes[1].set_xscale("symlog", linthresh=1.0)
        axes[1].set_xlabel("step")
        axes[1].set_title("partition statistics", fontsize=9)
    ax = axes[-1]
    found = False
    metric_rows = [json.loads(m) if m else {} for m in curve.column("metrics").to_pylist()]
    first = np.unique(steps, return_index=True)[1]
    if metrics is None:
        recorded = list(dict.fromkeys(k for r in metric_rows for k in r))
        metrics = [k for k in recorded if "acc" in k.lower()] or recorded
    for name in metrics:
        vals = np.array([metric_rows[i].get(name, np.nan) for i in first], dtype=float)
        if np.isfinite(vals).any():
            ax.plot(steps[first], vals, label=name)
            found = True
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("step")
    accuracy = all("acc" in name.lower() for name in metrics)
    ax.set_ylabel("accuracy" if accuracy else "metric")
    ax.set_title("metrics" if found else "no metrics recorded", fontsize=9)
    if found:
        ax.legend(fontsize=7)
    else:
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, Path(path))
