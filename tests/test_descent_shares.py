"""The descent's memory shares per depth, and the glue of one pattern's pieces.

On a GPU each depth of the descent may take what the depths above it leave of the memory
budget, keeping an even split for every depth below (``Descent.grow_shares``); on a CPU
the split stays even. Either way the partition is the same; only the batches differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import shapely
import torch
from torch import nn

import geomstore.engine.partition as partition_module
from geomstore import Slice, partition
from geomstore.engine.descent import Descent
from tests.nets import SmallCNN, digits_slice


def _deep_conv() -> tuple[nn.Module, Slice]:
    """Three conv layers on 16x16 inputs: a cell carries ~10^4 floats, so a 16 MiB budget
    splits the deep depths into many batches."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 10 * 10, 3),
    ).eval()
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 16, 16, generator=g, dtype=torch.float64)
    b, c = (a + 0.3 * torch.randn(a.shape, generator=g, dtype=torch.float64) for _ in range(2))
    return net, Slice.through(a.numpy(), b.numpy(), c.numpy(), margin=0.05)


class _Trace:
    """Records every batch of the descent: depth, what was left for it, its size."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, Any]] = []
        descend, sizes = Descent._descend, Descent._sizes
        trace = self

        def _descend(self: Descent, layer: int, polys: Any, *args: Any) -> None:
            trace.calls.append({"layer": layer, "q": len(polys), "avail": args[-1], "d": self})
            descend(self, layer, polys, *args)

        def _sizes(self: Descent, layer: int, live: Any, width: int, chunk: int) -> Any:
            batch, block, per = sizes(self, layer, live, width, chunk)
            trace.calls[-1] |= {"chunk": chunk, "batch": batch, "per": per}
            return batch, block, per

        monkeypatch.setattr(Descent, "_descend", _descend)
        monkeypatch.setattr(Descent, "_sizes", _sizes)


def _run(monkeypatch: pytest.MonkeyPatch, grow: bool) -> tuple[Any, list[dict[str, Any]]]:
    net, sl = _deep_conv()
    monkeypatch.setattr(Descent, "grow_shares", grow)
    trace = _Trace(monkeypatch)
    part = partition(net, sl, memory="16MiB")
    monkeypatch.undo()
    return part, trace.calls


def test_growing_shares_give_the_same_partition_in_fewer_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    even, even_calls = _run(monkeypatch, False)
    grown, grown_calls = _run(monkeypatch, True)
    assert len(grown_calls) < 0.6 * len(even_calls), (len(grown_calls), len(even_calls))
    assert even.n_regions == grown.n_regions > 10_000
    a, b = even.regions.to_pydict(), grown.regions.to_pydict()
    assert sorted(a["pattern_hash"]) == sorted(b["pattern_hash"])
    area_a = dict(zip(a["pattern_hash"], a["area"], strict=True))
    area_b = dict(zip(b["pattern_hash"], b["area"], strict=True))
    assert max(abs(area_a[h] - area_b[h]) for h in area_a) < 1e-12
    assert even.edges.num_rows == grown.edges.num_rows
    net, _ = _deep_conv()
    assert grown.verify(net, grid=12, points=1).ok


def test_every_depth_keeps_its_even_split_and_the_batches_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for grow in (False, True):
        _, calls = _run(monkeypatch, grow)
        d: Descent = calls[0]["d"]
        n = d.n_layers
        for c in calls:
            depth, avail = c["layer"], c["avail"]
            # what the depths above hold leaves every depth from here down its even split
            assert avail >= (n + 1 - depth) * d.level_min
            # each batch computes in three times its elements, beside the deeper reserve
            batches = -(-c["q"] // c["batch"])
            biggest = -(-c["q"] // batches)
            assert 3 * biggest * c["per"] <= avail - (n - depth) * d.level_min
            if not grow:
                assert c["chunk"] == max(1 << 12, d.level_min // 3)
        # the deep depths took more than their even split where the shallow ones left it
        if grow:
            assert max(c["chunk"] for c in calls) > 2 * (d.level_min // 3)


def test_a_cpu_keeps_the_even_split_and_a_fixed_chunk_overrides_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net, sl = _deep_conv()
    trace = _Trace(monkeypatch)
    partition(net, sl, memory="16MiB")  # grow_shares None: on the CPU, even
    d: Descent = trace.calls[0]["d"]
    assert {c["chunk"] for c in trace.calls} == {max(1 << 12, d.level_min // 3)}
    trace.calls.clear()
    monkeypatch.setattr(Descent, "grow_shares", True)
    partition(net, sl, chunk_elements=50_000)
    assert {c["chunk"] for c in trace.calls} == {50_000}


def test_pieces_of_one_pattern_are_glued_into_one_convex_region(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A max unit's tournament cuts some cells in pieces with one pattern: they come back
    as one convex region each, every pattern once, the domain tiled."""
    seen: dict[str, int] = {}
    merge = partition_module.merge_equal_patterns

    def counting(raw: dict[str, Any], tol: float) -> dict[str, Any]:
        h = raw["hashes"].numpy()
        _, counts = np.unique(h, axis=0, return_counts=True)
        seen["groups"] = int((counts > 1).sum())
        seen["pieces"] = len(h)
        return merge(raw, tol)

    monkeypatch.setattr(partition_module, "merge_equal_patterns", counting)
    net, sl = SmallCNN().eval(), digits_slice()
    part = partition(net, sl)
    assert seen["groups"] > 10  # the case is real: pieces were glued
    assert part.n_regions < seen["pieces"]
    table = part.regions.to_pydict()
    hashes = table["pattern_hash"]
    assert len(set(hashes)) == len(hashes) == part.n_regions
    polys = shapely.from_wkb(table["geometry"])
    hulls = shapely.convex_hull(polys)
    areas = shapely.area(polys)
    assert np.allclose(shapely.area(hulls), areas, rtol=1e-9, atol=1e-15)  # convex
    assert np.allclose(areas, table["area"], rtol=1e-9, atol=1e-15)
    domain = shapely.Polygon(sl.domain)
    assert abs(areas.sum() - domain.area) < 1e-9 * domain.area
    assert part.verify(net, grid=12, points=1).ok


def test_the_decision_boundary_does_not_depend_on_the_chunks() -> None:
    """Chunks of different polygon widths are joined with padding that repeats vertex 0:
    zeros there once put a phantom corner at the slice's centre into the boundary's
    clips, and a 16 MiB budget gave 413 segments, 131 of them off the tie, for 282."""
    net, sl = _deep_conv()
    small, whole = partition(net, sl, memory="16MiB"), partition(net, sl, memory="4GiB")
    assert small.boundary.num_rows == whole.boundary.num_rows > 100

    def segments(part: Any) -> np.ndarray:
        b = part.boundary.to_pydict()
        seg = np.stack([b["u0_a"], b["u1_a"], b["u0_b"], b["u1_b"]], 1)
        return seg[np.lexsort(seg.T[::-1])]

    assert np.abs(segments(small) - segments(whole)).max() < 1e-12
    report = small.verify(net, grid=12, points=1)
    assert report.ok, report


def test_stages_on_the_programs_nodes_run_in_blocks_and_give_the_same_partition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With growing shares a stage that runs the program's nodes (a skip connection, a
    conv too large for a matrix) takes its cells in blocks, not all at once: the blocks'
    tensors that later stages read are joined again, and nothing else changes."""
    import geomstore.engine.descent as descent_module
    from tests.nets import Residual

    BOX = Slice.box((-1.5, -1.5), (1.5, 1.5))
    net = Residual().eval()
    whole = partition(net, BOX)
    sliced = []
    rows = descent_module._rows

    def counting(env: dict[Any, Any], lo: int, hi: int, p: int) -> dict[Any, Any]:
        out = rows(env, lo, hi, p)
        if out is not env:
            sliced.append((lo, hi, p))
        return out

    monkeypatch.setattr(descent_module, "_rows", counting)
    monkeypatch.setattr(Descent, "grow_shares", True)
    monkeypatch.setattr(Descent, "block_elements", 200)  # a few cells per block
    blocked = partition(net, BOX)
    assert len(sliced) > 10 and any(lo > 0 for lo, _, _ in sliced)
    assert blocked.n_regions == whole.n_regions
    a, b = whole.regions.to_pydict(), blocked.regions.to_pydict()
    assert sorted(a["pattern_hash"]) == sorted(b["pattern_hash"])
    area = dict(zip(a["pattern_hash"], a["area"], strict=True))
    assert max(abs(area[h] - x) for h, x in zip(b["pattern_hash"], b["area"], strict=True)) < 1e-12
    assert blocked.edges.num_rows == whole.edges.num_rows
    assert blocked.boundary.num_rows == whole.boundary.num_rows
    assert blocked.verify(net, grid=12, points=1).ok


def test_dropping_glued_rows_from_packed_chunks() -> None:
    """merge's packed patterns lose the glued pieces' rows chunk by chunk: the same rows
    as indexing the concatenation, and chunks that lose none are not copied."""
    from geomstore.engine.merge import _drop_rows

    rng = np.random.default_rng(3)
    chunks = [rng.integers(0, 255, (m, 5), dtype=np.uint8) for m in (7, 0, 12, 3, 9)]
    whole = np.concatenate(chunks)
    for gone in ([], [0], [6, 7], [18, 19, 20, 21, 30], list(range(len(whole)))):
        gone_a = np.array(gone, dtype=np.int64)
        got = _drop_rows(chunks, gone_a)
        assert len(got) == len(chunks)
        np.testing.assert_array_equal(np.concatenate(got), np.delete(whole, gone_a, axis=0))
        for old, new in zip(chunks, got, strict=True):
            lost = len(old) - len(new)
            assert (new is old) == (lost == 0)


def test_counts_without_a_sync_equal_bincount() -> None:
    """The GPU's counts (an index_add of ones: CUDA's bincount reads min and max back to
    the host) are bincount's, empty bins and empty input included."""
    from geomstore.engine.kernels import _added_counts, bincount

    rng = np.random.default_rng(5)
    for n, size in ((1, 0), (7, 0), (7, 50), (1000, 3), (300, 20_000)):
        idx = torch.as_tensor(rng.integers(0, n, size), dtype=torch.int64)
        want = torch.bincount(idx, minlength=n)
        for got in (_added_counts(idx, n), bincount(idx, n)):
            assert got.dtype == torch.int64 and torch.equal(got, want)
