"""Where a zoo network's cached partition spends its time: one profiled run.

A GPU partition of a small conv net (LeNet-5) is bound by host time per dispatched
operation rather than by kernels; this runs the partition until its traced graph is
cached, then one more under ``torch.profiler`` and prints one JSON line: the wall time,
the GPU's busy share (kernel time over wall time, on CUDA), the operations dispatched,
the host time per operation, and the operators that took the most host (self CPU) time.
``--table FILE`` also writes the profiler's operator table (by self CPU time, and by
self CUDA time on a GPU).

    python benchmarks/zoo_profile.py --device cuda               # LeNet-5 (benchmarks/cuda.sh)
    python benchmarks/zoo_profile.py --only resnet-digits --device cpu --table /tmp/t.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from zoo import SCALES, plane
from zoo_nets import build

from geomstore import partition


def profile_one(name: str, device: str, scale: float, top: int, table: str | None) -> dict:
    """Profile one cached partition of zoo network ``name`` on ``device``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    net, shape = build(name)
    sl = plane(name, shape, scale)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):  # the first traces the graph; the second warms the allocator
        part = partition(net, sl, device=device)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        part = partition(net, sl, device=device)
        sync()
        wall = time.perf_counter() - t
    events = prof.key_averages()
    ops = [e for e in events if e.key.startswith("aten::")]
    # operations the engine dispatched: aten calls not made inside another aten call
    n_ops = sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    )
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # the union of kernel intervals (several streams may overlap)
        if b > end:
            busy += b - max(a, end)
            end = b
    by_host = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    if table:
        with open(table, "a") as f:
            f.write(f"== {name} on {device}, cached partition, {wall:.4f} s\n")
            f.write(events.table(sort_by="self_cpu_time_total", row_limit=40))
            if cuda:
                f.write(events.table(sort_by="self_cuda_time_total", row_limit=25))
            f.write("\n")
    return {
        "network": name,
        "device": device,
        "scale": scale,
        "regions": part.n_regions,
        "seconds_profiled": round(wall, 4),
        "gpu_busy_share": round(busy / 1e6 / wall, 3) if cuda else None,
        "aten_ops": n_ops,
        "host_us_per_op": round(1e6 * wall / max(n_ops, 1), 1),
        "top_host_ms": {e.key: round(e.self_cpu_time_total / 1e3, 2) for e in by_host},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["lenet5"], help="zoo networks (lenet5)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=float, help="noise scale of the plane (zoo default)")
    ap.add_argument("--top", type=int, default=12, help="operators listed (12)")
    ap.add_argument("--table", help="append the profiler's operator tables to this file")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; use --device cpu")
    for name in args.only:
        if name not in SCALES:
            ap.error(f"unknown network {name!r}; the zoo has: {', '.join(sorted(SCALES))}")
        scale = args.scale if args.scale is not None else SCALES[name]
        out: Any = profile_one(name, args.device, scale, args.top, args.table)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
