"""Partition speed: prints one JSON object per network (regions, seconds, regions/s, memory).

Usage: python benchmarks/partition.py [--device auto|cpu|cuda] [--repeat 3] [--quick]
       [--large] [--compare-cpu] [--no-ops] [--no-cache] [--widths 1024,1024 2048,2048]

Networks: seeded, PyTorch-default-initialised ReLU MLPs on [-1, 1]^2 and a small CNN
(conv, batch norm, max-pooling) on the plane through three 8x8 images. Seconds are the
best of ``--repeat`` runs and include affine maps, edges and the decision boundary. A
model's lowered graph is cached (see ``geomstore.engine.cache``), so the timed runs trace
it once, like a worker partitioning slices of one checkpoint; ``--no-cache`` traces it in
every run (``"lowering_cache": false``), the figures before the cache.
``--large`` runs only 2-1210-1210-1, a partition of about 10^6 regions, once: its peak
memory shows that chunking bounds the descent.

``ops_per_1k_regions`` counts the tensor operations one partition dispatches (every ATen
call, views included, seen by a ``TorchDispatchMode``) per 1,000 regions, in a separate
untimed run, the network's first (its tracing included). It is deterministic, so it
compares versions on a noisy machine; on a GPU it is what bounds small networks (each
operation is a kernel launch). On CUDA,
``gpu_busy_share`` is the GPU kernel time (profiler) over the wall time of one run.
``--compare-cpu`` also runs each network on the CPU in the same process and prints
``cpu_over_device``, the ratio of CPU seconds to device seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geomstore import Partition, Slice, partition
from geomstore.engine.lower import CACHE as LOWERING_CACHE
from geomstore.engine.partition import resolve_device
from geomstore.errors import GeomstoreError

MLPS = [(100, 100), (64, 64, 64, 64), (256, 256), (256, 256, 256)]
LARGE = (1210, 1210)


def mlp_name(widths: tuple[int, ...]) -> str:
    return "2-" + "-".join(map(str, widths)) + "-1"


def mlp(widths: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = 2
    for w in widths:
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers).eval()


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _timed(
    model: nn.Module, sl: Slice, device: str, repeat: int, trace: bool = False
) -> tuple[float, Partition]:
    best = float("inf")
    part = None
    for _ in range(repeat):
        if trace:
            LOWERING_CACHE.clear()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        part = partition(model, sl, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    assert part is not None
    return best, part


def _gpu_busy_share(model: nn.Module, sl: Slice, device: str) -> float:
    """Time the GPU runs kernels (union of their intervals) over the wall time of one run."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        partition(model, sl, device=device)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    )
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # merge overlapping kernels (several streams)
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e6 / wall


def _profile(name: str, model: nn.Module, sl: Slice, device: str, path: str) -> None:
    """Append the profiler's operator table of one run to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as prof:
        partition(model, sl, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    with open(path, "a") as f:
        f.write(f"== {name} on {device}\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=50))
        f.write("\n")


def run(
    name: str,
    model: nn.Module,
    sl: Slice,
    device: str,
    repeat: int,
    *,
    ops: bool = True,
    compare_cpu: bool = False,
    profile: str | None = None,
    busy: bool = True,
    trace: bool = False,
) -> dict[str, object]:
    count = None
    if ops:  # untimed, and it warms up (tracing, first-call allocations) before the timing
        with OpCounter() as counter:
            partition(model, sl, device=device)
        count = counter.count
    best, part = _timed(model, sl, device, repeat, trace)
    dev = str(part.settings["device"])
    res: dict[str, object] = {
        "network": name,
        "device": dev,
        "regions": part.n_regions,
        "edges": part.edges.num_rows,
        "boundary_segments": part.boundary.num_rows,
        "seconds": round(best, 4),
        "regions_per_second": round(part.n_regions / best),
        "peak_rss_mib": round(_peak_mib(), 1),
        "lowering_cache": not trace,
    }
    if count is not None:
        res["ops"] = count
        res["ops_per_1k_regions"] = round(1000 * count / part.n_regions, 1)
    print(f"{name}: {res['seconds']} s on {dev}", file=sys.stderr, flush=True)
    if dev.startswith("cuda") and busy:
        res["gpu_busy_share"] = round(_gpu_busy_share(model, sl, device), 3)
    if profile:
        _profile(name, model, sl, device, profile)
    if compare_cpu:
        cpu_best, cpu_part = _timed(model, sl, "cpu", repeat, trace)
        res["cpu_seconds"] = round(cpu_best, 4)
        res["cpu_regions"] = cpu_part.n_regions
        res["cpu_over_device"] = round(cpu_best / best, 2)
    return res


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def widths_arg(text: str) -> tuple[int, ...]:
    """An argparse type: hidden widths such as ``1024,1024``."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(
            f"expected hidden widths >= 1 separated by commas, such as 1024,1024; got {text!r}"
        )
    return widths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda")
    ap.add_argument("--repeat", type=positive_int, default=3, help="timed runs, best taken (3)")
    ap.add_argument("--quick", action="store_true", help="smallest networks only, one run")
    ap.add_argument("--large", action="store_true", help="one 10^6-region MLP, one run")
    ap.add_argument(
        "--compare-cpu", action="store_true", help="also run on the CPU, print the ratio"
    )
    ap.add_argument("--no-ops", action="store_true", help="skip the operation count")
    ap.add_argument("--no-cache", action="store_true", help="trace the model in every timed run")
    ap.add_argument(
        "--no-busy", action="store_true", help="skip the GPU busy share (a profiled run)"
    )
    ap.add_argument(
        "--widths",
        nargs="+",
        type=widths_arg,
        metavar="W,W,...",
        help="hidden widths of the MLPs to run instead of the default ones (e.g. 1024,1024)",
    )
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="write the profiler's table of operators (by device time) of one run per network",
    )
    args = ap.parse_args()
    try:
        device = resolve_device(args.device)
    except GeomstoreError as e:
        ap.error(str(e))
    if args.compare_cpu and device.type == "cpu":
        ap.error(
            "--compare-cpu compares a GPU with this machine's CPU, but the device here is the "
            "CPU (no CUDA); run with --device cuda on a GPU machine, or drop --compare-cpu."
        )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    box = Slice.box((-1, -1), (1, 1))
    # warm up as a running worker is: CUDA context, kernels, allocator (runs without the
    # operation count, which warms up each network, would time that first start)
    for dev in {args.device, "cpu"} if args.compare_cpu else {args.device}:
        partition(mlp((8, 8)), box, device=dev)
    opts = {
        "ops": not args.no_ops and not args.large,
        "compare_cpu": args.compare_cpu,
        "profile": args.profile,
        "busy": not args.no_busy,
        "trace": args.no_cache,
    }
    if args.large:
        res = run(mlp_name(LARGE), mlp(LARGE), box, args.device, 1, **opts)
        print(json.dumps(res), flush=True)
        return
    nets = MLPS[:1] if args.quick else MLPS
    repeat = 1 if args.quick else args.repeat
    if args.widths:
        nets = args.widths
    for widths in nets:
        res = run(mlp_name(widths), mlp(widths), box, args.device, repeat, **opts)
        print(json.dumps(res), flush=True)
    if args.widths:
        return
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand((1, 8, 8), generator=g, dtype=torch.float64).numpy() for _ in range(3)]
    plane = Slice.through(*imgs, margin=0.1)
    res = run("cnn-8x8", CNN().eval(), plane, args.device, repeat, **opts)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
