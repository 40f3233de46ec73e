"""The demo and version commands."""

from __future__ import annotations

from pathlib import Path

import typer

from geomstore.cli.common import app, emit, err, metrics_columns, out, progress


@app.command()
def demo(
    out_dir: Path = typer.Option(
        Path("geomstore-demo"), "--out", help="Folder for the store and the pictures."
    ),
    steps: int = typer.Option(2000, help="Training steps."),
    checkpoints: int = typer.Option(25, help="Checkpoints to record (at least 2)."),
    width: int = typer.Option(32, help="Hidden width of the 2-w-w-2 MLP."),
) -> None:
    """Train an MLP on two moons, record its partition at each checkpoint into a store,
    print the local-complexity trajectory and the statistics, and draw the pictures.

    Example: geomstore demo --out geomstore-demo
    """
    from geomstore.demo import run_demo

    if checkpoints < 2:
        raise typer.BadParameter("record at least 2 checkpoints", param_hint="--checkpoints")
    with progress() as bar:
        task = bar.add_task("training and recording", total=steps + 1)
        res = run_demo(
            out_dir,
            steps=steps,
            checkpoints=checkpoints,
            width=width,
            on_step=lambda s: bar.update(task, completed=s + 1),
        )
    base = ["step", "split", "n_points", "lc_mean", "lc_q25", "lc_q75"]
    curve = metrics_columns(res.trajectory.select([*base, "metrics"]))  # + train_acc, ...
    emit(curve, title=f"local complexity near the moons (r=0.1), {res.model}")
    for split, tp in res.turning_points.items():
        out.print(
            f"turning points ({split}): " + ", ".join(f"{k} at step {v}" for k, v in tp.items())
        )
    keep = [
        "step",
        "n_regions",
        "area_mean",
        "vertices_mean",
        "slope_norm_mean",
        "boundary_length",
        "n_boundary_segments",
    ]
    emit(res.stats.select(keep), title="partition statistics per checkpoint")
    out.print(f"final partition: {res.n_regions} regions, test accuracy {res.accuracy:.3f}")
    out.print(str(res.report), markup=False, highlight=False)
    out.print(
        f'store: {res.store}  (try: geomstore sql {res.store} "SELECT step, n_regions '
        'FROM gs_partitions ORDER BY step")'
    )
    for p in res.pictures:
        out.print(f"picture: {p}")
    if not res.report.ok:
        err.print("Error: the final partition failed verification (see above).")
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the versions of geomstore, torch and the engine.

    Example: geomstore version
    """
    import torch

    import geomstore

    out.print(
        f"geomstore {geomstore.__version__} (engine {geomstore.ENGINE_VERSION}), "
        f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"
    )
