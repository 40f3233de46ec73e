"""The model zoo benchmark: exact partitions of the networks researchers train.

Each network runs in its own process (so that its peak RSS is its own), on the plane
through a fixed synthetic input ``a`` and two copies ``a + s * noise`` (triangle domain,
margin 0.05; the INR: a triangle in its own 2-D input). One JSON line per network:
regions, seconds, peak RSS, float64 multiply-adds per region (counted by
``torch.utils.flop_counter`` in a second, untimed run of the same partition, when the
first took under ``--count-under`` seconds, 120 by default), the achieved GFLOP/s beside this
machine's float64 matmul GFLOP/s (2048 x 2048, measured in the same run), whether the
partition passed ``verify()``, and, for a run stopped at ``--max-seconds``, the regions
finished by then and the region rate (from the progress callback). With ``--repeat N``
the same partition runs N more times after the first and ``seconds_cached`` is the best of
them: the traced graph is reused (``geomstore.engine.cache``), as for a worker's later slices
of one checkpoint; ``--compare-cpu`` then also prints ``cpu_over_device_cached``.

    python benchmarks/zoo.py --quick          # LeNet-5 and a digits-sized ResNet (CI)
    python benchmarks/zoo.py                  # the whole zoo
    python benchmarks/zoo.py --only resnet20 --scale 0.003 --max-seconds 900
    python benchmarks/zoo.py --device cuda --compare-cpu --only lenet5 resnet20
    python benchmarks/zoo.py --device cuda --compare-cpu --only vgg11 --repeat 2 --no-verify
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from zoo_nets import build

# network -> noise scale of the plane (chosen so that the full triangle finishes here)
SCALES = {
    "lenet5": 0.05,
    "resnet-digits": 0.05,
    "maxout-mlp": 0.05,
    "inr-2-256x4-3": 0.0,
    "resnet20": 0.003,
    "vgg11": 0.0005,
    "resnet18": 0.0005,
}
QUICK = ["lenet5", "resnet-digits"]
BRUTE_FORCE_MAX = 20_000  # regions; above it verify() skips its brute-force region count
QUICK_SCALES = {"lenet5": 0.01, "resnet-digits": 0.05}
FULL = ["lenet5", "resnet-digits", "maxout-mlp", "inr-2-256x4-3", "resnet20", "vgg11", "resnet18"]


def matmul_gflops(n: int = 2048, repeat: int = 3, device: str = "cpu") -> float:
    """This machine's float64 matmul rate on ``device`` (best of ``repeat``)."""
    a = torch.rand(n, n, dtype=torch.float64, device=device)
    b = torch.rand(n, n, dtype=torch.float64, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def plane(name: str, shape: tuple[int, ...], scale: float) -> Any:
    from geomstore import Slice

    g = torch.Generator().manual_seed(1)
    if name.startswith("inr"):
        pts = torch.tensor([[-0.9, -0.8], [0.9, -0.7], [0.0, 0.95]], dtype=torch.float64)
        return Slice.through(*pts.numpy(), margin=0.05, domain="triangle", name=name)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    b = a + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    c = a + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return Slice.through(a.numpy(), b.numpy(), c.numpy(), margin=0.05, domain="triangle")


def _warm_up(device: str) -> None:
    """One small conv net partitioned first, as in a running worker: the timed run then
    holds no CUDA context creation, kernel loading or cuDNN set-up."""
    from torch import nn

    from geomstore import Slice, partition

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)
    ).eval()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64).numpy()
    partition(net, Slice.through(*x, margin=0.05), device=device)


def _child(
    name: str,
    scale: float,
    memory: str | None,
    verify: bool,
    device: str,
    count_under: float,
    repeat: int,
    out: Any,
) -> None:
    """Run one network; send progress lines and a final result through ``out``."""
    from torch.utils.flop_counter import FlopCounterMode

    from geomstore import partition

    model, shape = build(name)
    sl = plane(name, shape, scale)
    last = [0.0]

    def progress(p: Any) -> None:
        now = time.perf_counter()
        if now - last[0] > 2.0:
            last[0] = now
            out.put({"progress": p.regions, "elapsed": p.elapsed, "pending": list(p.pending)})

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    _warm_up(device)
    t0 = time.perf_counter()
    part = partition(model, sl, device=device, memory=memory, progress=progress)
    sync()
    seconds = time.perf_counter() - t0
    cached = None
    for _ in range(repeat):  # the lowering cache now holds the model's graph
        t1 = time.perf_counter()
        partition(model, sl, device=device, memory=memory)
        sync()
        cached = min(cached or float("inf"), time.perf_counter() - t1)
    flops = None
    if seconds < count_under:  # count in a second, untimed run: it slows small ops down
        counter = FlopCounterMode(display=False)
        with counter:
            partition(model, sl, device=device, memory=memory)
        flops = counter.get_total_flops()
    ok = None
    if verify:
        # the brute-force region count (plain ReLU MLPs) is an independent method but slow
        # past some 10^4 regions (the INR's 62,838 took over 400 s); the other checks stay
        brute = part.n_regions <= BRUTE_FORCE_MAX
        ok = bool(part.verify(model, grid=24, points=1, brute_force=brute).ok)
    out.put(
        {
            "regions": part.n_regions,
            "seconds": seconds,
            "seconds_cached": cached,
            "flops": flops,
            "units": part.model_summary["n_units"],
            "patterns": part.model_summary["patterns"],
            "verified": ok,
            "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "device": str(part.settings["device"]),
            "budget_gib": part.settings["memory"] / 2**30,
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30
            if device.startswith("cuda")
            else None,
        }
    )


def _hwm_gib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def run(
    name: str,
    scale: float,
    memory: str | None,
    max_seconds: float,
    verify: bool,
    gf: float,
    device: str = "cpu",
    count_under: float = 120.0,
    repeat: int = 0,
) -> dict:
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    args = (name, scale, memory, verify, device, count_under, repeat, q)
    proc = ctx.Process(target=_child, args=args, daemon=True)
    t0 = time.perf_counter()
    proc.start()
    prog: dict[str, Any] = {}
    result: dict[str, Any] | None = None
    rss = None
    try:
        while result is None and time.perf_counter() - t0 < max_seconds:
            try:
                msg = q.get(timeout=1.0)
            except queue.Empty:
                if not proc.is_alive():
                    break
                rss = _hwm_gib(proc.pid) or rss
                continue
            rss = _hwm_gib(proc.pid) or rss
            if "progress" in msg:
                prog = msg
                print(json.dumps({"network": name, **msg}), file=sys.stderr, flush=True)
            else:
                result = msg
    except BaseException:  # Ctrl-C, SIGTERM (see main): the child goes with us
        proc.kill()
        proc.join(5)
        raise
    line: dict[str, Any] = {"network": name, "device": device, "scale": scale}
    if result is None:
        proc.kill()
        proc.join(5)
        done = prog.get("progress", 0)
        line |= {
            "completed": False,
            "stopped_after_s": round(time.perf_counter() - t0, 1),
            "regions_finished": done,
            "regions_per_s": round(done / max(prog.get("elapsed", 1e-9), 1e-9), 2),
            "pending_cells_per_depth": prog.get("pending"),
            "peak_rss_gib": round(rss, 2) if rss else None,
            "exitcode": proc.exitcode,
        }
        return line
    proc.join(30)
    regions = max(1, result["regions"])
    flops = result["flops"]
    line |= {
        "completed": True,
        "device": result["device"],
        "regions": result["regions"],
        "seconds": round(result["seconds"], 2),
        "regions_per_s": round(result["regions"] / result["seconds"], 1),
        "seconds_cached": None
        if result["seconds_cached"] is None
        else round(result["seconds_cached"], 3),
        "peak_rss_gib": round(result["rss_gib"], 2),
        "memory_budget_gib": round(result["budget_gib"], 2),
        "units": result["units"],
        "patterns": result["patterns"],
        "madds_per_region": None if flops is None else round(flops / 2 / regions),
        "gflops": None if flops is None else round(flops / result["seconds"] / 1e9, 2),
        "matmul_gflops": round(gf, 1),
        "share_of_matmul": None
        if flops is None
        else round(flops / result["seconds"] / 1e9 / gf, 3),
        "verified": result["verified"],
    }
    if result["gpu_peak_gib"] is not None:
        line["gpu_peak_gib"] = round(result["gpu_peak_gib"], 2)
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="LeNet-5 and a digits-sized ResNet")
    ap.add_argument("--only", nargs="*", help="networks to run (default: the whole zoo)")
    ap.add_argument("--scale", type=float, help="noise scale of the plane (overrides)")
    ap.add_argument(
        "--memory",
        help="memory budget of each partition (default: the engine's, half the GPU's "
        "memory on CUDA, else min(4 GiB, RAM / 4))",
    )
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop a network after")
    ap.add_argument("--no-verify", action="store_true", help="skip verify() (large partitions)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--count-under",
        type=float,
        default=120.0,
        help="count FLOPs (a second run) for partitions faster than this many seconds",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=0,
        help="time N more runs after the first, with the traced graph cached (seconds_cached)",
    )
    ap.add_argument(
        "--compare-cpu",
        action="store_true",
        help="also run each network on the CPU (own process), print cpu_over_device",
    )
    args = ap.parse_args()
    if args.repeat < 0:
        ap.error(f"--repeat must be 0 or more; got {args.repeat}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device must be cpu or cuda[:N]; got {args.device!r}")
    if args.compare_cpu and args.device == "cpu":
        ap.error("--compare-cpu compares --device cuda with this machine's CPU; drop it on the CPU")
    unknown = [n for n in args.only or () if n not in SCALES]
    if unknown:
        ap.error(f"unknown network(s) {', '.join(unknown)}; the zoo has {', '.join(FULL)}")
    # a terminated benchmark takes its network's process with it (SystemExit unwinds run())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    names = args.only or (QUICK if args.quick else FULL)
    gf = matmul_gflops(device=args.device)
    head = {"machine": args.device, "cores": os.cpu_count(), "matmul_gflops": round(gf, 1)}
    cpu_gf = gf
    if args.compare_cpu and args.device != "cpu":
        cpu_gf = matmul_gflops()
        head["cpu_matmul_gflops"] = round(cpu_gf, 1)
    print(json.dumps(head), flush=True)
    for name in names:
        scales = QUICK_SCALES if args.quick else SCALES
        scale = args.scale if args.scale is not None else scales[name]
        verify = not args.no_verify
        line = run(
            name,
            scale,
            args.memory,
            args.max_seconds,
            verify,
            gf,
            args.device,
            args.count_under,
            args.repeat,
        )
        if args.compare_cpu and args.device != "cpu":
            cpu = run(
                name, scale, args.memory, args.max_seconds, False, cpu_gf, "cpu", 0.0, args.repeat
            )
            if cpu.get("completed") and line.get("completed"):
                line["cpu_seconds"] = cpu["seconds"]
                line["cpu_regions"] = cpu["regions"]
                line["cpu_over_device"] = round(cpu["seconds"] / max(line["seconds"], 1e-9), 2)
                if cpu["seconds_cached"] and line["seconds_cached"]:
                    line["cpu_seconds_cached"] = cpu["seconds_cached"]
                    ratio = cpu["seconds_cached"] / max(line["seconds_cached"], 1e-9)
                    line["cpu_over_device_cached"] = round(ratio, 2)
            else:
                line["cpu"] = cpu
        print(json.dumps(line), flush=True)
        if args.quick and not (line.get("completed") and line.get("verified")):
            sys.exit(f"{name}: the quick zoo must complete and verify")


if __name__ == "__main__":
    main()
