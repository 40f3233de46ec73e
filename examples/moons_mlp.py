"""Example (a): an MLP trained on two moons, checkpoints saved as files, computed by a
worker through the store's job queue, then queried and plotted.

    python examples/moons_mlp.py [--out examples-out/moons] [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import geomstore
from geomstore import plot
from geomstore.demo import PLANE, moons_mlp, two_moons
from geomstore.queries import lc_trajectory, partition_stats, sample_boundary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    ap.add_argument("--out", type=Path, default=Path("examples-out/moons"))
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke test)")
    args = ap.parse_args()
    steps, every = (200, 40) if args.quick else (1500, 100)
    ckpt = args.out / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)

    # 1. train, saving a checkpoint (an export program + its metrics) every `every` steps
    torch.manual_seed(0)
    x, y = two_moons(512, seed=0)
    xt, yt = two_moons(512, seed=1)
    X, Y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    net = moons_mlp(24)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                acc = float(
                    (net(torch.tensor(xt, dtype=torch.float32)).argmax(1) == torch.tensor(yt))
                    .float()
                    .mean()
                )
            program = torch.export.export(net.eval(), (torch.zeros(1, 2),))
            torch.export.save(program, str(ckpt / f"step-{step:05d}.pt2"))
            meta = {"step": step, "metrics": {"test_acc": acc}}
            (ckpt / f"step-{step:05d}.json").write_text(json.dumps(meta))
            net.train()
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), Y).backward()
        opt.step()

    # 2. queue every checkpoint and run a worker (`geomstore submit` + `geomstore worker`)
    with geomstore.open(args.out / "store") as store:
        for f in sorted(ckpt.glob("*.pt2")):
            geomstore.submit(store, geomstore.ModelSpec(str(f)), PLANE, model="moons")
        counts = geomstore.Worker(store).run(once=True)
        print(f"worker: {counts['done']} partitions computed")
        store.add_points("moons-test", PLANE, xt, labels=yt, split="test")

        # 3. query: local complexity near the test points, statistics, boundary samples
        curve, turns = lc_trajectory(store, model="moons", points="moons-test", radius=0.1)
        stats = partition_stats(store, model="moons")
        for row in stats.select(["step", "n_regions", "boundary_length"]).to_pylist():
            print(
                f"step {row['step']:>5}: {row['n_regions']:>5} regions, "
                f"boundary length {row['boundary_length']:.3f}"
            )
        print("turning points of local complexity:", turns)
        last = (
            store.sql(
                "SELECT partition_id FROM gs_partitions WHERE model = 'moons' "
                "ORDER BY step DESC LIMIT 1"
            )
            .table.column(0)[0]
            .as_py()
        )
        final = store.load_partition(last)
        pts = sample_boundary(final.boundary, final.slice, 200, seed=0)
        print(f"{pts.num_rows} points sampled on the final decision boundary")

        # 4. pictures
        parts = [
            store.load_partition(p)
            for p in store.sql(
                "SELECT partition_id FROM gs_partitions WHERE model = 'moons' ORDER BY step"
            )
            .table.column(0)
            .to_pylist()
        ]
    titles = [f"step {r['step']}" for r in stats.to_pylist()]
    drawn = [
        plot.draw_partition(final, args.out / "final.png", color="class", points=(xt, yt)),
        plot.small_multiples(parts, args.out / "run.png", titles=titles),
        plot.animate(parts, args.out / "run.gif", titles=titles),
        plot.plot_trajectory(curve, stats, args.out / "curves.png"),
    ]
    for p in drawn:
        print("wrote", p)


if __name__ == "__main__":
    main()
