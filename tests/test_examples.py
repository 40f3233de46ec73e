"""The examples run (quick mode) and produce verified partitions and their pictures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "pictures"),
    [
        ("moons_mlp.py", ["final.png", "run.png", "run.gif", "curves.png"]),
        ("digits_cnn.py", ["plane-class.png", "plane-slope.png"]),
        ("inr_levelsets.py", ["inr-slope.png", "inr-levels.png"]),
    ],
)
def test_example_runs(script: str, pictures: list[str], tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[FAIL]" not in res.stdout
    for name in pictures:
        assert (tmp_path / name).stat().st_size > 10_000, name
