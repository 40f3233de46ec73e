from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

import geomstore
from geomstore.cli import app

runner = CliRunner()
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_version_prints_versions() -> None:
    res = runner.invoke(app, ["version"])
    assert res.exit_code == 0
    assert f"geomstore {geomstore.__version__}" in res.output


def test_demo_records_a_run_and_draws_it(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["demo", "--out", str(tmp_path), "--steps", "60", "--checkpoints", "20"]
    )
    assert res.exit_code == 0, res.output
    assert "[FAIL]" not in res.output
    assert "[ok] tiling" in res.output and "local complexity" in res.output
    for name in ("partition.png", "partition-class.svg", "checkpoints.png", "trajectory.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    from PIL import Image

    assert Image.open(tmp_path / "training.gif").n_frames == 20
    with geomstore.open(tmp_path / "store", read_only=True) as store:
        steps = store.sql("SELECT step FROM gs_partitions ORDER BY step").table
    assert steps.num_rows == 20 and steps.column("step")[-1].as_py() == 60


def test_every_command_is_documented_with_an_example() -> None:
    for cmd in app.registered_commands:
        name = cmd.name or cmd.callback.__name__  # type: ignore[union-attr]
        assert f"geomstore {name}" in README, f"command {name} missing from README"
        doc = cmd.callback.__doc__ or ""  # type: ignore[union-attr]
        assert re.search(r"Example: geomstore " + name, doc), f"{name} help lacks an example"


def test_public_api_is_pinned() -> None:
    expected = (
        "ENGINE_VERSION GeomstoreError InvalidSliceError ModelLoadError ModelShapeError "
        "ModelSpec Partition QueryResult Recorder Slice Store UnsupportedModelError "
        "VerifyReport Worker __version__ compute connect load_model open partition submit verify"
    )
    assert sorted(geomstore.__all__) == sorted(expected.split())


def test_every_column_of_the_partition_tables_is_documented() -> None:
    import torch

    doc = (Path(__file__).resolve().parents[1] / "docs" / "tables.md").read_text()
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.ReLU(), torch.nn.Linear(6, 1))
    part = geomstore.partition(net, geomstore.Slice.box((-1, -1), (1, 1)), device="cpu")
    for name in ("regions", "edges", "boundary"):
        for col in getattr(part, name).column_names:
            assert re.search(rf"\| [^|\n]*\b{re.escape(col)}\b[^|\n]* \|", doc), (name, col)
