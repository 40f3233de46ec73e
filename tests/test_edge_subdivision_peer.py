"""The edge-subdivision peer of ``benchmarks/edge_subdivision.py`` counts regions exactly.

Issue #12 times geomstore against it, so it must be right: it must count what
``partition`` counts on seeded MLPs (one layer, two, three; more than 64 sign-vector
columns, so several words of bits) and a known count on a hand-built arrangement.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from geomstore import Slice, partition
from tests.nets import BOX, mlp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import edge_subdivision as es


@pytest.mark.parametrize("widths", [(8,), (16, 16), (20, 20, 20), (40, 40), (12, 12, 12, 12)])
def test_counts_equal_partitions(widths: tuple[int, ...]) -> None:
    net = mlp(widths)
    cx = es.subdivide(net)
    expected = partition(net, BOX, device="cpu").n_regions
    assert cx.ne - cx.nv + 1 == expected
    assert es.face_sign_vectors(cx).shape[0] == expected  # one sign vector per face
    assert es.count_regions(net) == expected


def test_counts_on_another_box() -> None:
    net = mlp((16, 16), seed=3)
    sl = Slice.box((-3.0, -3.0), (2.0, 2.0))
    assert es.count_regions(net, -3.0, 2.0) == partition(net, sl, device="cpu").n_regions


def _lines(k: int, seed: int) -> tuple[nn.Sequential, int]:
    """k lines through random points of [-1, 1]^2, and 1 + k + (their crossings inside)."""
    g = np.random.default_rng(seed)
    angle = g.uniform(0, np.pi, k)
    normal = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    offset = -(normal * g.uniform(-0.9, 0.9, (k, 2))).sum(axis=1)
    crossings = 0
    for i, j in itertools.combinations(range(k), 2):
        p = np.linalg.solve(normal[[i, j]], -offset[[i, j]])
        crossings += bool(np.all(np.abs(p) < 1))
    net = nn.Sequential(nn.Linear(2, k), nn.ReLU(), nn.Linear(k, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(normal))
        net[0].bias.copy_(torch.from_numpy(offset))
    return net, 1 + k + crossings


@pytest.mark.parametrize("seed", [0, 1])
def test_lines_in_general_position(seed: int) -> None:
    net, expected = _lines(15, seed)
    assert expected > 1 + 15  # some lines cross inside the box
    assert es.count_regions(net) == expected
    assert partition(net, BOX, device="cpu").n_regions == expected


def test_one_line() -> None:
    net = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.5]]))
        net[0].bias.fill_(0.1)
    cx = es.subdivide(net)
    assert (cx.nv, cx.ne, es.count_regions(net)) == (6, 7, 2)


def test_refuses_what_is_not_a_relu_mlp() -> None:
    with pytest.raises(ValueError, match=r"expected nn\.Sequential"):
        es.count_regions(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)))
    with pytest.raises(ValueError, match=r"expected nn\.Sequential"):
        es.count_regions(nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)))


@pytest.mark.parametrize("argv", [["--repeat", "0"], ["--widths", "8,x"], ["--widths", "8,0"]])
def test_main_validates_arguments(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["edge_subdivision.py", *argv])
    with pytest.raises(SystemExit) as exc:
        es.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edge_subdivision.py: error: argument")


def test_main_prints_one_line_per_network(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["edge_subdivision.py", "--repeat", "1", "--widths", "8,8"])
    es.main()
    (line,) = capsys.readouterr().out.strip().splitlines()
    res = json.loads(line)
    assert res["network"] == "2-8-8-1"
    assert res["counts_agree"] is True and res["regions"] == res["es_regions"]
    assert res["speedup"] > 0
