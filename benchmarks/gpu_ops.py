"""Tensor operations a GPU partition dispatches, counted on the CPU with the GPU's settings.

On a GPU the engine is bound by kernel launches and device-to-host syncs, not arithmetic,
and a GPU is lent only some of the time. This benchmark runs the CPU with every setting
the engine picks for a CUDA device (arrangements for every layer of line units, blocks
and batches sized for a GPU, growing shares, one convolution per stage, GPU-sized hash
blocks, boundary screening where the tensors are), counts the ATen operations of one
partition (graph cached, as for a worker's later slices), the kernels among them (the
operations that are not views, which launch nothing) and the syncs (``nonzero``,
``.item()``, boolean indexing), and prints one JSON line per network with
the functions that dispatch the most. Counts are deterministic, so two commits compare
on a busy machine; the partition is the GPU's (same code, same choices), only the device
differs. Operations on host tensors (the weights hash of a model kept on the CPU) count
too, though on a GPU run they launch nothing; those of the max-pool rounds that a GPU
hands to its CPU (``engine/tournaments.py``) are ``host_ops``, apart.

    python benchmarks/gpu_ops.py                           # LeNet-5 at a 39 GiB budget
    python benchmarks/gpu_ops.py --only lenet5 vgg11 --memory 16GiB --top 12

The memory budget is the GPU's (an H100's default is half its free memory, about 39 GiB),
but the tensors live in this machine's RAM: LeNet-5 peaks at about 4 GB, VGG-11 at 7 GB
(16 GiB budget), ResNet-20 at 16 GB (18 GiB budget).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from zoo import SCALES, plane
from zoo_nets import build

from geomstore import partition

_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive"}


@contextlib.contextmanager
def gpu_settings() -> Iterator[None]:
    """The engine's CUDA choices on the CPU, restored on exit."""
    import geomstore.engine.arrangement as arrangement
    import geomstore.engine.boundary_edges as boundary_edges
    import geomstore.engine.graph as graph
    import geomstore.engine.kernels as kernels
    import geomstore.engine.partition as part
    import geomstore.engine.patterns as patterns
    import geomstore.engine.split as split
    import geomstore.engine.tournaments as tournaments
    from geomstore.engine.descent import Descent

    saved: list[tuple[Any, str, Any]] = []

    def put(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    of = patterns.PatternHash.of

    def of_gpu(self: Any, states: Any, offset: int = 0, *, block: int | None = None) -> Any:
        return of(self, states, offset, block=block or 1 << 26)  # the CUDA default

    boundary = part.boundary_segments

    def boundary_gpu(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("screen", True)  # tensors are screened where they are
        return boundary(*args, **kwargs)

    put(split, "ARRANGEMENT_DEVICES", ("cuda", "cpu"))
    put(Descent, "block_elements", Descent.device_block_elements)
    put(Descent, "grow_shares", True)
    put(graph, "CONV_PIECE_BYTES", 1 << 60)  # convolutions whole, as on a GPU
    put(graph, "GEMM_POSITIONS", -1)
    put(patterns.PatternHash, "of", of_gpu)
    put(part, "boundary_segments", boundary_gpu)
    put(boundary_edges, "SCREEN_FROM", 0)  # edges screened where they are
    put(tournaments, "_tail_to_host", lambda device: True)  # a layer's last rounds on the host
    for module in (split, arrangement):  # counts without a sync
        put(module, "bincount", kernels._added_counts)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _on_host(frame: Any) -> bool:
    """Whether an operation runs in the max-pool rounds' tail that a GPU hands to its CPU."""
    while frame is not None:
        caller = frame.f_back
        if caller is not None and caller.f_code.co_name == "_finish_on_host":
            return frame.f_code.co_name in ("_rounds", "__init__")
        frame = caller
    return False


class _Counter(TorchDispatchMode):
    """Operations and syncs by the geomstore function that dispatched them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()  # ops less views
        self.syncs: collections.Counter[str] = collections.Counter()
        self.host = 0  # operations of the max-pool rounds' tail, which a GPU run does on its CPU

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        frame = sys._getframe(1)
        while frame is not None and "geomstore" not in frame.f_code.co_filename:
            frame = frame.f_back
        where = f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}" if frame else "?"
        if _on_host(frame):
            self.host += 1
            return func(*args, **(kwargs or {}))
        self.ops[where] += 1
        if not func.is_view:  # a view launches nothing
            self.kernels[where] += 1
        name = func.overloadpacket.__name__
        masks = args[1] if name == "index" and len(args) > 1 else ()
        # repeat_interleave by a tensor of counts sizes its output from their sum
        counted = name == "repeat_interleave" and (kwargs or {}).get("output_size") is None
        if (
            name in _SYNCS
            or counted
            or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in masks)
        ):
            self.syncs[where] += 1
        return func(*args, **(kwargs or {}))


def count(name: str, scale: float, memory: str, top: int) -> dict[str, Any]:
    net, shape = build(name)
    sl = plane(name, shape, scale)
    with gpu_settings():
        partition(net, sl, device="cpu", memory=memory)  # traces: the count is of a cached run
        counter = _Counter()
        t0 = time.perf_counter()
        with counter:
            part = partition(net, sl, device="cpu", memory=memory)
        seconds = time.perf_counter() - t0
    ops = sum(counter.ops.values())
    return {
        "network": name,
        "scale": scale,
        "memory": memory,
        "regions": part.n_regions,
        "ops": ops,
        "ops_per_1k_regions": round(1000 * ops / part.n_regions, 1),
        "kernels": sum(counter.kernels.values()),
        "syncs": sum(counter.syncs.values()),
        "host_ops": counter.host,
        "seconds_counted": round(seconds, 1),
        "top_ops": dict(counter.ops.most_common(top)),
        "top_kernels": dict(counter.kernels.most_common(top)),
        "top_syncs": dict(counter.syncs.most_common(top)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["lenet5"], help="zoo networks (lenet5)")
    ap.add_argument("--scale", type=float, help="noise scale of the plane (zoo default)")
    ap.add_argument("--memory", default="39GiB", help="the GPU's memory budget (39GiB)")
    ap.add_argument("--top", type=int, default=8, help="functions listed (8)")
    args = ap.parse_args()
    for name in args.only:
        scale = args.scale if args.scale is not None else SCALES[name]
        print(json.dumps(count(name, scale, args.memory, args.top)), flush=True)


if __name__ == "__main__":
    main()
