"""Store write speed: prints JSON (regions written per second into a store).

Usage: python benchmarks/store.py [--kind ducklake|duckdb] [--repeat 5]

One partition of a seeded 2-256-256-3 MLP on [-1, 1]^2 (about 37,000 regions, 75,000
edges) is written repeatedly as new checkpoints; each write is one transaction with the
regions, edges and decision boundary. Seconds are the best of ``--repeat`` writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import geomstore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["ducklake", "duckdb"], default="ducklake")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--width", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    w = args.width
    net = nn.Sequential(nn.Linear(2, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 3))
    part = geomstore.partition(net, geomstore.Slice.box((-1, -1), (1, 1)))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / ("store" if args.kind == "ducklake" else "store.duckdb")
        with geomstore.open(target) as store:
            times = []
            for i in range(args.repeat):
                t = time.perf_counter()
                store.add(part, model="bench", checkpoint=f"c{i}", step=i)
                times.append(time.perf_counter() - t)
    best = min(times)
    print(
        json.dumps(
            {
                "store": args.kind,
                "regions": part.n_regions,
                "edges": part.edges.num_rows,
                "boundary_segments": part.boundary.num_rows,
                "best_seconds": round(best, 4),
                "median_seconds": round(sorted(times)[len(times) // 2], 4),
                "regions_per_second": round(part.n_regions / best),
            }
        )
    )


if __name__ == "__main__":
    main()
