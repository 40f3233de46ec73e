"""The GPU's code paths on the CPU (``benchmarks/gpu_ops.py``): the same partition, counted.

CI has no GPU, so the choices the engine makes for a CUDA device (arrangements for every
layer of line units, blocks as large as the depth's chunk, growing shares, whole
convolutions, GPU-sized hash blocks, boundary screening) run here on the CPU: they must
give the regions the CPU's own choices give, and the counting benchmark must leave the
engine's settings as it found them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from geomstore import partition
from geomstore.engine import split, tournaments
from geomstore.engine.descent import Descent

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

gpu_ops = pytest.importorskip("gpu_ops")


def _regions(part: object) -> dict[bytes, float]:
    r = part.regions.to_pydict()  # type: ignore[attr-defined]
    return dict(zip(r["pattern_hash"], r["area"], strict=True))


@pytest.mark.parametrize("name", ["lenet5", "resnet-digits"])
def test_the_gpus_choices_give_the_cpus_partition(name: str) -> None:
    from zoo import plane
    from zoo_nets import build

    net, shape = build(name)
    sl = plane(name, shape, 0.01 if name == "lenet5" else 0.05)
    cpu = partition(net, sl, device="cpu")
    with gpu_ops.gpu_settings():
        assert split.ARRANGEMENT_DEVICES == ("cuda", "cpu") and Descent.grow_shares
        gpu = partition(net, sl, device="cpu", memory="2GiB")
    assert split.ARRANGEMENT_DEVICES == ("cuda",) and Descent.grow_shares is None
    a, b = _regions(cpu), _regions(gpu)
    assert a.keys() == b.keys()  # the same activation patterns, so the same regions
    keys = sorted(a)
    np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=1e-9, atol=0)
    assert gpu.verify(net, grid=32).ok


def test_the_count_names_the_functions_that_dispatch() -> None:
    line = gpu_ops.count("lenet5", 0.01, "2GiB", 5)
    assert line["regions"] > 100 and line["ops"] > line["regions"] / 10
    assert 0 < line["syncs"] < line["ops"]
    assert len(line["top_ops"]) == 5 and sum(line["top_ops"].values()) <= line["ops"]
    assert all(
        k.split(".")[0]
        in {
            "split",
            "tournaments",
            "arrangement",
            "crossings",
            "descent",
            "tables",
            "nonlinear",
            "patterns",
            "cache",
            "merge",
            "graph",
            "wkb",
            "partition",
            "lower",
        }
        for k in line["top_ops"]
    )
    assert split.ARRANGEMENT_DEVICES == ("cuda",)  # restored
    # the max-pool rounds' tail ran on the host, counted apart, and the CPU keeps its own
    assert 0 < line["host_ops"] < line["ops"]
    assert not tournaments._tail_to_host(torch.device("cpu"))


def test_the_profile_names_where_the_host_time_goes(tmp_path: Path) -> None:
    zoo_profile = pytest.importorskip("zoo_profile")
    table = tmp_path / "profile.txt"
    line = zoo_profile.profile_one("resnet-digits", "cpu", 0.05, 4, str(table))
    assert line["regions"] > 100 and line["gpu_busy_share"] is None
    # the engine's own calls, not the aten calls nested in them
    assert line["regions"] < line["aten_ops"] < 20_000 and line["host_us_per_op"] > 0
    top = line["top_host_ms"]
    assert len(top) == 4 and all(k.startswith("aten::") for k in top)
    assert "resnet-digits on cpu" in table.read_text() and "Self CPU" in table.read_text()
