"""The CUDA path against the CPU path: every operator family, partitions equal region for region.

Skipped where there is no CUDA (as in CI); run on a GPU machine by ``benchmarks/cuda.sh``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from geomstore import Slice, partition
from geomstore.engine import split, tournaments
from tests.nets import BOX, ConvKinds, SmallCNN, digits_slice, mlp
from tests.test_engine import NETWORKS
from tests.test_reach import AFFINE, PIECEWISE, TinyResNet, Wrap, _plane

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _after_relu(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda h: f(torch.relu(h))


def _cases() -> dict[str, tuple[nn.Module, Slice]]:
    cases: dict[str, tuple[nn.Module, Slice]] = {
        f"engine/{k}": (f(), BOX) for k, f in NETWORKS.items()
    }
    for k, (f, shape, width, conv, _kinds) in PIECEWISE.items():
        cases[f"piecewise/{k}"] = (
            Wrap(f, shape, width, conv=width if conv else 0, seed=1),
            _plane(shape, scale=4.0),
        )
    for k in ("adaptive avg pool (1)", "global mean by hand", "conv transpose", "batch norm eval"):
        f, shape, width, conv = AFFINE[k]
        g = nn.Sequential(nn.ReLU(), f) if isinstance(f, nn.Module) else _after_relu(f)
        model = Wrap(g, shape, width, conv=width if conv else 0, seed=2)
        cases[f"affine/{k}"] = (model, _plane(shape, scale=4.0))
    cases["cnn/small"] = (SmallCNN(), digits_slice())
    cases["cnn/kinds"] = (ConvKinds(), digits_slice(1))
    cases["cnn/tiny-resnet"] = (TinyResNet(), _plane((1, 5, 5), seed=4, scale=6.0))
    cases["mlp/2-64-64-1"] = (mlp((64, 64), 1, seed=7), BOX)
    return cases


CASES = _cases()


def _same(a: object, b: object) -> None:
    assert a.n_regions == b.n_regions  # type: ignore[attr-defined]
    ha = np.sort(a.pattern_hashes().view("V16").ravel())  # type: ignore[attr-defined]
    hb = np.sort(b.pattern_hashes().view("V16").ravel())  # type: ignore[attr-defined]
    assert (ha == hb).all(), "CPU and CUDA found different activation patterns"


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_partition_equals_cpu(name: str) -> None:
    model, sl = CASES[name]
    model = model.eval()
    cpu = partition(model, sl, device="cpu")
    gpu = partition(model, sl, device="cuda")
    assert str(gpu.settings["device"]).startswith("cuda")
    _same(cpu, gpu)
    report = gpu.verify(model, grid=48)
    assert report.ok, str(report)


@pytest.mark.parametrize("arrangement", [True, False])
def test_cuda_is_deterministic_with_and_without_arrangements(
    arrangement: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(split, "ARRANGEMENT_DEVICES", ("cuda",) if arrangement else ())
    model = mlp((128, 128, 64), 3, seed=11)
    a = partition(model, BOX, device="cuda")
    b = partition(model, BOX, device="cuda")
    assert a.regions.equals(b.regions)
    assert a.edges.equals(b.edges)
    _same(partition(model, BOX, device="cpu"), a)


@pytest.mark.parametrize("tail", [0, 64, 1 << 30])
def test_max_rounds_handed_to_the_host_or_not_give_the_cpus_patterns(
    tail: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Max-pool rounds on the GPU (tail 0), their last ones on the host, or all of them
    there: the CPU's patterns, the same tables on every run, an exact partition."""
    calls = []
    finish = tournaments._finish_on_host

    def spy(*args):  # type: ignore[no-untyped-def]
        calls.append(int(args[3][0].shape[0]))  # the pairs left
        return finish(*args)

    monkeypatch.setattr(tournaments, "HOST_TAIL_PAIRS", tail)
    monkeypatch.setattr(tournaments, "_finish_on_host", spy)
    model, sl = ConvKinds(1).eval(), digits_slice(1)
    a = partition(model, sl, device="cuda")
    assert bool(calls) == (tail > 0) and all(t <= tail for t in calls)
    b = partition(model, sl, device="cuda")
    assert a.regions.equals(b.regions) and a.edges.equals(b.edges)
    _same(partition(model, sl, device="cpu"), a)
    report = a.verify(model, grid=48)
    assert report.ok, str(report)


def test_tables_that_do_not_fit_on_the_gpu_are_built_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An out-of-memory error while building the tables on the device moves the raw
    regions to the CPU and builds them there, with the same result."""
    from geomstore.engine import partition as partition_mod

    model = mlp((64, 64), 3, seed=5)
    want = partition(model, BOX, device="cuda")
    tables = partition_mod._tables
    devices: list[str] = []

    def once_out_of_memory(raw: dict, *args: object) -> object:
        devices.append(raw["verts"].device.type)
        if len(devices) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (planted by the test)")
        return tables(raw, *args)

    monkeypatch.setattr(partition_mod, "_tables", once_out_of_memory)
    got = partition(model, BOX, device="cuda")
    assert devices == ["cuda", "cpu"]
    _same(want, got)
    assert got.verify(model, grid=48).ok


def test_index_add_is_the_same_on_every_run_and_leaves_the_flag_alone() -> None:
    """Rows that receive many terms sum them in one order on every run, without turning
    on ``torch.use_deterministic_algorithms`` (a process-wide flag other threads see)."""
    from geomstore.engine.descent import _index_add

    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 7, (20_000,), generator=g).cuda()
    values = torch.randn((20_000, 3, 5), generator=g, dtype=torch.float64).cuda()
    runs = []
    for _ in range(3):
        out = torch.zeros((7, 3, 5), dtype=torch.float64, device="cuda")
        _index_add(out, index, values)
        assert not torch.are_deterministic_algorithms_enabled()
        runs.append(out.cpu())
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    want = torch.zeros((7, 3, 5), dtype=torch.float64).index_add_(0, index.cpu(), values.cpu())
    assert torch.allclose(runs[0], want, rtol=0, atol=1e-9)


def test_a_cached_graph_keeps_its_gpu_weights_and_matrices_and_stays_exact() -> None:
    """Later partitions of a model reuse its device copy and stage matrices, not stale
    ones: a changed model gets its own."""
    from geomstore.engine.graph import Program
    from geomstore.engine.lower import CACHE

    CACHE.clear()
    model = mlp((32, 32), 2, seed=8)
    dev = torch.device("cuda")
    a, b = Program(model, (2,), dev), Program(model, (2,), dev)
    assert a.static and all(b.static[n] is t for n, t in a.static.items())
    assert all(t.device.type == "cuda" for t in a.static.values() if isinstance(t, Tensor))
    first = partition(model, BOX, device="cuda")
    again = partition(model, BOX, device="cuda")
    assert again.regions.equals(first.regions)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    changed = partition(model, BOX, device="cuda")
    assert changed.verify(model, grid=48).ok
    CACHE.clear()
    _same(changed, partition(model, BOX, device="cpu"))


def test_the_default_budget_does_not_move_with_what_others_hold() -> None:
    from geomstore.engine.partition import default_memory

    dev = torch.device("cuda")
    before = default_memory(dev)
    _free, total = torch.cuda.mem_get_info(dev)
    held = torch.empty(min(1 << 30, total // 16), dtype=torch.uint8, device=dev)  # another's
    try:
        assert default_memory(dev) == before == total // 2
    finally:
        del held
    net = mlp((16, 16), 2, seed=3)
    a = partition(net, BOX, device="cuda")
    b = partition(net, BOX, device="cuda")
    assert a.settings["memory"] == b.settings["memory"] == total // 2
    for table in ("regions", "edges", "boundary"):
        assert getattr(a, table).equals(getattr(b, table))


@pytest.mark.parametrize(
    "out", [([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]], [0.0, 0.0]), ([[1.0, -1.0, 0.0]], [0.0])]
)
def test_boundary_on_a_hinge_is_found_on_the_gpu(out: tuple) -> None:
    """The edge screen runs on the GPU: a tie along a hinge (two classes, or one output's
    level set) gives the CPU's boundary segments there."""
    from tests.test_boundary_edges import _net, _segments

    net = _net(*out)
    cpu = _segments(partition(net, BOX, device="cpu"))
    gpu = _segments(partition(net, BOX, device="cuda"))
    assert len(cpu) >= 1 and np.isclose(np.abs(cpu[:, 3] - cpu[:, 1]).sum(), 2.0)
    np.testing.assert_allclose(
        gpu[np.lexsort(gpu.T[::-1])], cpu[np.lexsort(cpu.T[::-1])], rtol=0, atol=1e-12
    )
