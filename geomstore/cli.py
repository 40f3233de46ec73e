"""The geomstore command line: a thin layer over the Python API."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from geomstore.errors import GeomstoreError

app = typer.Typer(
    help="Exact linear-region geometry of piecewise-linear networks.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("geomstore-demo"), "--out", help="Folder for the pictures."),
    steps: int = typer.Option(400, help="Training steps."),
) -> None:
    """Train a small MLP on two moons, compute its exact partition, verify it and draw it.

    Example: geomstore demo --out geomstore-demo
    """
    from geomstore.demo import run_demo

    with out.status("training and partitioning ..."):
        res = run_demo(out_dir, steps=steps)
    p = res.partition
    table = Table(title="partition of the two-moons MLP")
    for col in ("regions", "edges", "boundary segments", "seconds", "train accuracy"):
        table.add_column(col, justify="right")
    table.add_row(
        str(p.n_regions),
        str(p.edges.num_rows),
        str(p.boundary.num_rows),
        f"{p.seconds:.3f}",
        f"{res.accuracy:.3f}",
    )
    out.print(table)
    out.print(str(res.report), markup=False, highlight=False)
    if res.picture is not None:
        out.print(f"picture written to {res.picture}")
    if not res.report.ok:
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


def main() -> None:
    """Entry point: user errors become 'Error: ...' on stderr and exit code 1."""
    try:
        app()
    except GeomstoreError as exc:
        err.print(f"Error: {exc}", highlight=False)
        sys.exit(1)
