"""Commands that ask questions of stored partitions: lc, stats, sample, compare, plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer

from geomstore.cli.common import STORE, app, emit, err, metrics_columns, open_store, out
from geomstore.errors import GeomstoreError

MODEL = typer.Option(..., "--model", "-m", help="The model's name in the store.")
SLICE = typer.Option(None, "--slice", help="Only this slice (name); default: the only one.")
CKPTS = typer.Option([], "--checkpoint", "-c", help="Only these checkpoints (repeatable).")
FMT = typer.Option("table", "--format", "-f", help="table, csv, json or parquet.")
OUTPUT = typer.Option(None, "--output", "-o", help="Write to this file.")


def grid_points(domain: np.ndarray, n: int) -> np.ndarray:
    """The centres of an n x n grid of equal cells over the bounding box of a slice's
    domain, kept where they lie inside it: all n * n of them on a box slice, fewer on a
    domain that does not fill its bounding box (a slice through three inputs).

    >>> grid_points(np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), 2).tolist()
    [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    """
    import shapely

    if n < 1:
        raise GeomstoreError(f"--grid N needs N >= 1 (an N x N grid of points); got {n}.")
    lo, hi = domain.min(0), domain.max(0)
    centres = (np.arange(n) + 0.5) / n
    g = np.stack(
        np.meshgrid(lo[0] + centres * (hi[0] - lo[0]), lo[1] + centres * (hi[1] - lo[1])), -1
    ).reshape(-1, 2)
    # the cell centres of a box domain are strictly inside it; the test drops only those
    # outside a domain that is not a box
    inside = shapely.intersects_xy(shapely.Polygon(domain), g[:, 0], g[:, 1])
    return np.asarray(g[inside], dtype=np.float64)


def _grid_points(st: Any, model: str, slice_name: str | None, n: int) -> np.ndarray:
    from geomstore.queries.stats import resolve_partitions

    parts = resolve_partitions(st, model=model, slice=slice_name)
    sl = st.load_slice(parts.column("slice_id")[0].as_py())
    return grid_points(np.asarray(sl.domain, dtype=np.float64), n)


def _dataset_points(st: Any, name: str, slice_id: str) -> tuple[np.ndarray, np.ndarray | None]:
    from geomstore.queries import dataset_points

    return dataset_points(st, dataset=name, slice=slice_id)


@app.command()
def lc(
    store: str = STORE,
    model: str = MODEL,
    points: str | None = typer.Option(None, help="A stored data set (store.add_points)."),
    grid: int | None = typer.Option(
        None,
        help="Instead of --points: the centres of an N x N grid of cells over the slice's "
        "domain (its bounding box; on a slice through three inputs the points outside the "
        "domain are left out).",
    ),
    radius: float = typer.Option(..., "--radius", "-r", help="Neighbourhood radius (u units)."),
    layers: str = typer.Option(
        "hidden",
        help="hidden: the nonlinearities' units; all: also the logits (as the grokking "
        "paper's MLP curves count).",
    ),
    slice_name: str | None = SLICE,
    checkpoint: list[str] = CKPTS,
    fmt: str = FMT,
    output: Path | None = OUTPUT,
) -> None:
    """Local complexity near the data, per checkpoint: the trajectory and its turning points,
    beside each checkpoint's stored metrics (one column per metric, such as accuracy).

    Example: geomstore lc runs/moons --model moons-mlp --points moons --radius 0.1 --layers all
    """
    from geomstore.queries import lc_trajectory

    if (points is None) == (grid is None):
        raise GeomstoreError("give --points DATASET or --grid N (one of them).")
    if grid is not None and grid < 1:
        raise GeomstoreError(f"--grid N needs N >= 1 (an N x N grid of points); got {grid}.")
    with open_store(store, read_only=True) as st:
        pts: Any = points if grid is None else _grid_points(st, model, slice_name, grid)
        with err.status("computing local complexity ..."):
            table, turns = lc_trajectory(
                st,
                model=model,
                points=pts,
                radius=radius,
                slice=slice_name,
                checkpoints=checkpoint or None,
                layers=layers,  # type: ignore[arg-type]  # checked there, with the choices
            )
    emit(metrics_columns(table), fmt, output, title=f"local complexity, r={radius}")
    if fmt == "table":
        for split, tp in turns.items():
            out.print(
                f"turning points ({split}): " + ", ".join(f"{k} at step {v}" for k, v in tp.items())
            )


@app.command()
def stats(
    store: str = STORE,
    model: str = MODEL,
    slice_name: str | None = SLICE,
    checkpoint: list[str] = CKPTS,
    fmt: str = FMT,
    output: Path | None = OUTPUT,
) -> None:
    """Partition statistics per checkpoint: regions, areas, vertices, slopes, boundary.

    Example: geomstore stats runs/moons --model moons-mlp --format csv
    """
    from geomstore.queries import partition_stats

    with open_store(store, read_only=True) as st:
        table = partition_stats(st, model=model, slice=slice_name, checkpoints=checkpoint or None)
    if fmt == "table":
        keep = [
            "checkpoint",
            "step",
            "n_regions",
            "area_mean",
            "vertices_mean",
            "slope_norm_mean",
            "eccentricity_mean",
            "boundary_length",
            "n_boundary_segments",
        ]
        table = table.select([c for c in keep if c in table.column_names])
    emit(table, fmt, output, title=f"partition statistics of {model}")


@app.command()
def sample(
    store: str = STORE,
    model: str = MODEL,
    n: int = typer.Option(1000, "-n", help="Points per checkpoint."),
    slice_name: str | None = SLICE,
    checkpoint: list[str] = CKPTS,
    seed: int = typer.Option(0, help="Random seed (same seed, same points)."),
    offset: float = typer.Option(0.0, help="Push points this far along the boundary normal."),
    classes: str | None = typer.Option(None, help="Only this class pair, e.g. 0,1"),
    fmt: str = FMT,
    output: Path | None = OUTPUT,
) -> None:
    """Sample points uniformly (by length) on the decision boundary, per checkpoint.

    Example: geomstore sample runs/moons --model moons-mlp -n 500 -o boundary.parquet -f parquet
    """
    from geomstore.queries import boundary_samples

    opts: dict[str, Any] = {"seed": seed, "offset": offset}
    if classes:
        try:
            a, b = (int(v) for v in classes.split(","))
        except ValueError:
            raise GeomstoreError(
                f"--classes {classes!r}: give two class numbers, e.g. 0,1"
            ) from None
        opts["pair"] = (a, b)
    with open_store(store, read_only=True) as st:
        table = boundary_samples(
            st, model=model, n=n, slice=slice_name, checkpoints=checkpoint or None, **opts
        )
    if fmt == "table":
        table = table.drop_columns([c for c in ("x",) if c in table.column_names])
    emit(table, fmt, output, title=f"{table.num_rows} decision-boundary samples")


@app.command()
def compare(
    store: str = STORE,
    model: str = MODEL,
    slice_name: str | None = SLICE,
    checkpoint: list[str] = CKPTS,
    points: str | None = typer.Option(None, help="Also: pattern/label churn of this data set."),
    fmt: str = FMT,
    output: Path | None = OUTPUT,
) -> None:
    """Compare consecutive checkpoints: agreeing area, boundary movement (and churn).

    Example: geomstore compare runs/moons --model moons-mlp --points moons
    """
    from geomstore.queries import agreement_over, churn

    with open_store(store, read_only=True) as st, err.status("comparing checkpoints ..."):
        table = agreement_over(st, model=model, slice=slice_name, checkpoints=checkpoint or None)
        ch = None
        if points is not None:
            ch = churn(
                st, model=model, points=points, slice=slice_name, checkpoints=checkpoint or None
            )
    emit(table, fmt, output, title=f"{model}: consecutive checkpoints")
    if ch is not None:
        emit(ch, fmt, None, title=f"churn of {points}")


@app.command()
def plot(
    store: str = STORE,
    model: str = MODEL,
    out_path: Path = typer.Option(..., "--out", "-o", help=".png/.svg/.pdf, or .gif (animation)."),
    slice_name: str | None = SLICE,
    checkpoint: list[str] = CKPTS,
    color: str = typer.Option("slope", help="slope, class or lc."),
    grid: bool = typer.Option(False, "--grid", help="All checkpoints as small multiples."),
    points: str | None = typer.Option(None, help="Draw this stored data set on top."),
    radius: float | None = typer.Option(None, help="With --color lc: the radius."),
) -> None:
    """Draw partitions: the last checkpoint, a grid of all (--grid) or a GIF (--out x.gif).

    Example: geomstore plot runs/moons --model moons-mlp --color class --out moons.png
    """
    from geomstore import plot as gplot
    from geomstore.queries.stats import resolve_partitions

    animate = out_path.suffix.lower() == ".gif"
    gplot.check_image_path(out_path, animation=animate)  # before loading anything
    with open_store(store, read_only=True) as st:
        parts_t = resolve_partitions(
            st, model=model, slice=slice_name, checkpoints=checkpoint or None
        )
        rows = parts_t.to_pylist()
        if not (grid or animate):
            rows = rows[-1:]
        with err.status(f"loading {len(rows)} partition(s) ..."):
            parts = [st.load_partition(r["partition_id"]) for r in rows]
        pts = _dataset_points(st, points, rows[0]["slice_id"]) if points else None
    titles = [f"{r['checkpoint']} ({p.n_regions} regions)" for r, p in zip(rows, parts)]
    with err.status("drawing ..."):
        if animate:
            path = gplot.animate(
                parts, out_path, titles=titles, color=color, radius=radius, points=pts
            )
        elif grid:
            path = gplot.small_multiples(
                parts, out_path, titles=titles, color=color, radius=radius, points=pts
            )
        else:
            path = gplot.draw_partition(
                parts[0], out_path, color=color, radius=radius, points=pts, title=titles[0]
            )
    out.print(f"wrote {path}")
