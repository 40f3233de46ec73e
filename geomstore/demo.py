"""The demo: train a small MLP on two moons, partition its input plane, verify, draw."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from geomstore.engine.partition import Partition, partition
from geomstore.engine.verify import VerifyReport
from geomstore.slice import Slice

__all__ = ["DemoResult", "run_demo", "two_moons"]


def two_moons(n: int, *, noise: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles (the scikit-learn data set, without scikit-learn)."""
    rng = np.random.default_rng(seed)
    m = n // 2
    t0 = rng.uniform(0, math.pi, m)
    t1 = rng.uniform(0, math.pi, n - m)
    a = np.stack([np.cos(t0), np.sin(t0)], 1)
    b = np.stack([1 - np.cos(t1), 0.5 - np.sin(t1)], 1)
    x = np.concatenate([a, b]) + rng.normal(0, noise, (n, 2))
    y = np.concatenate([np.zeros(m, np.int64), np.ones(n - m, np.int64)])
    return x, y


@dataclass
class DemoResult:
    """What the demo computed."""

    partition: Partition
    report: VerifyReport
    accuracy: float
    picture: Path | None


def run_demo(out_dir: Path, *, steps: int = 400, width: int = 32, seed: int = 0) -> DemoResult:
    """Train a 2-w-w-2 ReLU MLP on two moons, partition [-1.5, 2.5] x [-1, 1.5], verify it."""
    torch.manual_seed(seed)
    x, y = two_moons(512, seed=seed)
    net = nn.Sequential(
        nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        opt.step()
    acc = float((net(xt).argmax(1) == yt).float().mean())
    sl = Slice.box((-1.5, -1.0), (2.5, 1.5), name="moons-plane")
    part = partition(net, sl)
    report = part.verify(net)
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = draw(part, out_dir / "partition.png", points=(x, y))
    return DemoResult(part, report, acc, picture)


def draw(
    part: Partition,
    path: Path,
    *,
    points: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path | None:
    """Draw regions by slope norm, thin edges, a bold decision boundary; None w/o matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.collections import LineCollection, PolyCollection
    except ImportError:
        return None
    import shapely

    polys = part.polygons()
    coords = [np.asarray(shapely.get_exterior_ring(p).coords) for p in polys]
    slope = np.asarray(part.regions.column("slope_norm"))
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    pc = PolyCollection(coords, array=slope, cmap="viridis", edgecolors="white", linewidths=0.2)
    ax.add_collection(pc)
    bd = part.boundary
    segs = np.stack(
        [
            np.stack([np.asarray(bd.column("u0_a")), np.asarray(bd.column("u1_a"))], 1),
            np.stack([np.asarray(bd.column("u0_b")), np.asarray(bd.column("u1_b"))], 1),
        ],
        1,
    )
    ax.add_collection(LineCollection(list(segs), colors="red", linewidths=2.0))
    if points is not None:
        ax.scatter(
            points[0][:, 0], points[0][:, 1], c=points[1], s=4, cmap="coolwarm", edgecolors="none"
        )
    lo, hi = part.slice.domain.min(0), part.slice.domain.max(0)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xlabel("u0")
    ax.set_ylabel("u1")
    ax.set_title(f"{part.n_regions} linear regions; decision boundary in red")
    fig.colorbar(pc, ax=ax, label="slope norm ||A||_F")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
