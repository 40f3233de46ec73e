"""Copies of finished chunks to the host beside the descent (``HostCopies.overlap``), on
and off, on the large MLPs: one JSON line per network and setting (best of ``--repeat``).

    python benchmarks/overlap.py --device cuda --widths 1024,1024 2048,2048
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from partition import mlp, mlp_name

from geomstore import Slice, partition
from geomstore.engine.host import HostCopies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--widths", nargs="+", default=["1024,1024"], metavar="W,W,...")
    args = ap.parse_args()
    box = Slice.box((-1, -1), (1, 1))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    partition(mlp((8, 8)), box, device=args.device)  # warm up
    for spec in args.widths:
        widths = tuple(int(w) for w in spec.split(","))
        net = mlp(widths)
        best = {True: float("inf"), False: float("inf")}
        regions = 0
        for _ in range(args.repeat):
            for overlap in (True, False):  # alternate: both see the same machine state
                HostCopies.overlap = overlap
                sync()
                t = time.perf_counter()
                regions = partition(net, box, device=args.device).n_regions
                sync()
                best[overlap] = min(best[overlap], time.perf_counter() - t)
        HostCopies.overlap = True
        for overlap, seconds in best.items():
            line = {"network": mlp_name(widths), "device": args.device, "overlap": overlap}
            line |= {"regions": regions, "seconds": round(seconds, 3)}
            line["regions_per_second"] = round(regions / seconds)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
