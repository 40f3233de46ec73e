"""The demo: train an MLP on two moons, record its geometry at every checkpoint into a
store, query the local-complexity trajectory and the partition statistics, draw."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from geomstore.engine.verify import VerifyReport
from geomstore.recorder import Recorder
from geomstore.slice import Slice
from geomstore.store.store import Store, open_store

__all__ = ["DemoResult", "moons_mlp", "run_demo", "two_moons"]

PLANE = Slice.box((-1.5, -1.0), (2.5, 1.5), name="moons-plane")


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


def moons_mlp(width: int = 32, depth: int = 2) -> nn.Sequential:
    """The demo's 2-width^depth-2 ReLU MLP (PyTorch default initialisation)."""
    layers: list[nn.Module] = []
    d = 2
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 2))


@dataclass
class DemoResult:
    """What the demo computed, and where it wrote it."""

    store: Path
    model: str
    trajectory: pa.Table
    turning_points: dict[str, dict[str, int | None]]
    stats: pa.Table
    report: VerifyReport
    accuracy: float
    n_regions: int
    pictures: list[Path] = field(default_factory=list)


def run_demo(
    out_dir: Path,
    *,
    steps: int = 2000,
    checkpoints: int = 25,
    width: int = 32,
    seed: int = 0,
    radius: float = 0.1,
    pictures: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> DemoResult:
    """Train on two moons, recording ``checkpoints`` partitions into ``out_dir/store``.

    Checkpoints fall on a geometric schedule (dense early, where the partition changes
    fastest). Then: the local-complexity trajectory near the train and test points, the
    partition statistics, a verification of the final partition against the model, and
    the pictures (final partition by class and by slope, a GIF and a grid of the run, the
    curves against the step).
    """
    from geomstore.queries import lc_trajectory, partition_stats

    torch.manual_seed(seed)
    x, y = two_moons(512, seed=seed)
    xt, yt = two_moons(512, seed=seed + 1)
    net = moons_mlp(width)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    X, Y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    XT, YT = torch.tensor(xt, dtype=torch.float32), torch.tensor(yt)
    marks = _schedule(steps, checkpoints)
    out_dir.mkdir(parents=True, exist_ok=True)
    store_path = out_dir / "store"
    model = f"moons-mlp-{width}x2-{steps}steps"  # one run per name: reruns add nothing
    with open_store(store_path) as store:
        rec = Recorder(store, model, PLANE)
        store.add_points("moons-train", PLANE, x, labels=y, split="train")
        store.add_points("moons-test", PLANE, xt, labels=yt, split="test")
        for step in range(steps + 1):
            if step in marks:
                with torch.no_grad():
                    acc = float((net(X).argmax(1) == Y).float().mean())
                    tacc = float((net(XT).argmax(1) == YT).float().mean())
                rec(net, step, {"train_acc": acc, "test_acc": tacc}, force=True)
            if on_step is not None:
                on_step(step)
            if step == steps:
                break
            opt.zero_grad()
            nn.functional.cross_entropy(net(X), Y).backward()
            opt.step()
        curve, turns = lc_trajectory(store, model=model, points="moons-train", radius=radius)
        test_curve, test_turns = lc_trajectory(
            store, model=model, points="moons-test", radius=radius
        )
        curve = pa.concat_tables([curve, test_curve])
        turns |= test_turns
        stats = partition_stats(store, model=model)
        from geomstore.engine.partition import partition

        final = partition(net.eval(), PLANE)
        report = final.verify(net)
        drawn: list[Path] = []
        if pictures:
            drawn = _pictures(store, model, out_dir, (x, y), curve, stats)
    return DemoResult(store_path, model, curve, turns, stats, report, tacc, final.n_regions, drawn)


def _schedule(steps: int, n: int) -> list[int]:
    """``n`` distinct steps from 0 to ``steps``, geometrically spaced (dense early)."""
    if n > steps + 1:
        return list(range(steps + 1))
    k = n - 1
    while True:
        marks = sorted({0, steps, *np.geomspace(1, steps, k).round().astype(int).tolist()})
        if len(marks) >= n:
            return marks
        k += 1


def _pictures(
    store: Store,
    model: str,
    out_dir: Path,
    data: tuple[np.ndarray, np.ndarray],
    curve: pa.Table,
    stats: pa.Table,
) -> list[Path]:
    from geomstore import plot
    from geomstore.queries.stats import resolve_partitions

    rows = resolve_partitions(store, model=model).to_pylist()
    parts = [store.load_partition(r["partition_id"]) for r in rows]
    titles = [f"step {r['step']}: {p.n_regions} regions" for r, p in zip(rows, parts)]
    pick = np.unique(np.linspace(0, len(parts) - 1, 8).round().astype(int))
    return [
        plot.draw_partition(parts[-1], out_dir / "partition.png", points=data, title=titles[-1]),
        plot.draw_partition(
            parts[-1], out_dir / "partition-class.svg", color="class", points=data, title=titles[-1]
        ),
        plot.small_multiples(
            [parts[i] for i in pick], out_dir / "checkpoints.png", titles=[titles[i] for i in pick]
        ),
        plot.animate(parts, out_dir / "training.gif", titles=titles, points=data),
        plot.plot_trajectory(curve, stats, out_dir / "trajectory.png"),
    ]
