"""Query speed: local complexity over checkpoints (query 2). Prints JSON.

Usage: python benchmarks/queries.py [--checkpoints 100] [--points 1000] [--width 128]
       [--repeat 5] [--layers hidden|all] [--shape disk|diamond]

Fills a DuckLake store with ``--checkpoints`` partitions of a 2-w-w-3 MLP (about 10,000
regions each at the default width; the weights drift from checkpoint to checkpoint like
a training run), then times ``lc_trajectory`` for ``--points`` random points at one radius,
``--repeat`` times on a freshly opened store each (``first_seconds`` is the first run,
``seconds`` the best: the machine is shared, so the best run is the one least disturbed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import geomstore
from geomstore.queries import lc_trajectory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=100)
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--radius", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--layers", choices=["hidden", "all"], default="hidden")
    ap.add_argument("--shape", choices=["disk", "diamond"], default="disk")
    args = ap.parse_args()
    torch.manual_seed(0)
    w = args.width
    net = nn.Sequential(nn.Linear(2, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 3))
    box = geomstore.Slice.box((-1, -1), (1, 1), name="box")
    regions = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with geomstore.open(Path(tmp) / "s") as store:
            for i in range(args.checkpoints):
                with torch.no_grad():
                    for prm in net.parameters():
                        prm.add_(0.01 * torch.randn_like(prm))
                part = geomstore.partition(net, box)
                regions.append(part.n_regions)
                store.add(part, model="bench", checkpoint=f"c{i:04d}", step=i)
        fill = time.perf_counter() - t
        pts = np.random.default_rng(0).uniform(-1, 1, (args.points, 2))
        runs = []
        for _ in range(max(1, args.repeat)):
            with geomstore.open(Path(tmp) / "s", read_only=True) as store:
                t = time.perf_counter()
                table, _turns = lc_trajectory(
                    store,
                    model="bench",
                    points=pts,
                    radius=args.radius,
                    layers=args.layers,
                    shape=args.shape,
                )
                runs.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "query": "lc_trajectory",
                "checkpoints": args.checkpoints,
                "points": args.points,
                "regions_per_partition_mean": round(float(np.mean(regions))),
                "radius": args.radius,
                "layers": args.layers,
                "shape": args.shape,
                "rows": table.num_rows,
                "seconds": round(min(runs), 3),
                "first_seconds": round(runs[0], 3),
                "runs": [round(r, 3) for r in runs],
                "fill_seconds": round(fill, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
