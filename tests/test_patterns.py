"""Pattern hashes, patterns on demand, the memory budget and progress reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import geomstore
from geomstore import GeomstoreError, Slice, partition
from geomstore.engine import partition as partition_mod
from geomstore.engine.descent import Progress
from geomstore.engine.patterns import (
    PatternHash,
    _pack_bits,
    pack_patterns,
    pack_states,
    unpack_patterns,
)
from geomstore.errors import MemoryBudgetError
from geomstore.queries import region_patterns
from tests.nets import BOX, ConvKinds, Residual, digits_slice, mlp


@pytest.fixture
def hash_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat every model as large: patterns are kept as hashes only."""
    monkeypatch.setattr(partition_mod, "PATTERN_LIMIT_BITS", 4)


def _same_regions(a: geomstore.Partition, b: geomstore.Partition) -> None:
    assert a.n_regions == b.n_regions
    np.testing.assert_array_equal(a.pattern_hashes(), b.pattern_hashes())
    for col in ("area", "centroid_u0", "centroid_u1", "A", "c", "label"):
        assert a.regions.column(col).equals(b.regions.column(col)), col


@pytest.mark.parametrize(
    "net, sl",
    [(mlp((12, 12), 3), BOX), (Residual(), BOX), (ConvKinds(), digits_slice())],
    ids=["mlp", "residual", "conv-kinds"],
)
def test_hashed_descent_matches_whole_patterns(
    net: nn.Module, sl: Slice, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = partition(net, sl, device="cpu")
    assert whole.states is not None and whole.model_summary["patterns"] == "whole"
    monkeypatch.setattr(partition_mod, "PATTERN_LIMIT_BITS", 4)
    hashed = partition(net, sl, device="cpu")
    assert hashed.states is None and hashed.model_summary["patterns"] == "hash"
    assert hashed.regions.column("pattern").null_count == hashed.n_regions
    _same_regions(whole, hashed)
    # the hash is that of the whole pattern; one region per pattern (a max unit's
    # tournament cuts cells into pieces that are glued back), so hashes are unique
    h = PatternHash(whole.model_summary["n_units"]).of(torch.from_numpy(whole.states)).numpy()
    np.testing.assert_array_equal(h, hashed.pattern_hashes())
    assert len(np.unique(whole.states, axis=0)) == whole.n_regions
    assert len({tuple(r) for r in h}) == whole.n_regions
    # patterns on demand equal the whole ones, and the hashed partition verifies
    ids = np.arange(0, hashed.n_regions, 3)
    np.testing.assert_array_equal(hashed.patterns(ids), whole.states[ids])
    assert hashed.verify(net, grid=40).ok


def test_patterns_of_a_stored_hashed_partition_need_the_right_model(
    hash_only: None, tmp_path: object
) -> None:
    net = mlp((10, 10), 2, seed=3)
    part = partition(net, BOX, device="cpu")
    with geomstore.open(str(tmp_path)) as store:
        pid = store.add(part, model="m", checkpoint="c", step=0)
        back = store.load_partition(pid)
        some = region_patterns(store, partition_id=pid, net=net, region_ids=[2, 0])
    np.testing.assert_array_equal(some, part.patterns([2, 0]))
    assert back.states is None
    np.testing.assert_array_equal(back.pattern_hashes(), part.pattern_hashes())
    with pytest.raises(GeomstoreError, match="net="):
        back.patterns([0])
    got = back.patterns([0, 1, back.n_regions - 1], net=net)
    np.testing.assert_array_equal(got, part.patterns([0, 1, part.n_regions - 1]))
    with pytest.raises(GeomstoreError, match="weights differ"):
        back.patterns([0], net=mlp((10, 10), 2, seed=4))
    with pytest.raises(GeomstoreError, match="region ids"):
        part.patterns([part.n_regions])


def test_whole_patterns_round_trip_with_their_hashes(tmp_path: object) -> None:
    part = partition(ConvKinds(), digits_slice(), device="cpu")
    with geomstore.open(str(tmp_path)) as store:
        back = store.load_partition(store.add(part, model="k", checkpoint="c"))
    np.testing.assert_array_equal(back.states, part.states)
    np.testing.assert_array_equal(back.pattern_hashes(), part.pattern_hashes())


def test_memory_budget_names_the_tensor_that_does_not_fit() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 48 * 48, 2)
    ).eval()
    g = torch.Generator().manual_seed(0)
    pts = [torch.rand(3, 48, 48, generator=g, dtype=torch.float64).numpy() for _ in range(3)]
    with pytest.raises(MemoryBudgetError, match=r"budget of 16 MiB.*memory=") as info:
        partition(net, Slice.through(*pts), device="cpu", memory="16MiB")
    assert "(64, 48, 48)" in str(info.value)


def test_memory_budget_is_parsed_and_bounds_chunks() -> None:
    assert partition_mod.parse_memory("1.5GiB") == 3 << 29
    assert partition_mod.parse_memory("64M") == 64 << 20
    for bad in ("lots", "-1GB", "1KB", True):
        with pytest.raises(GeomstoreError, match="memory"):
            partition_mod.parse_memory(bad)  # type: ignore[arg-type]
    net = mlp((16, 16), 2)
    small = partition(net, BOX, device="cpu", memory="16MiB")
    big = partition(net, BOX, device="cpu", memory="8GiB")
    _same_regions(small, big)
    assert small.settings["memory"] == 16 << 20


def test_progress_reports_regions_pending_cells_and_time() -> None:
    seen: list[Progress] = []
    net = mlp((20, 20), 2)
    part = partition(net, BOX, device="cpu", chunk_elements=3000, progress=seen.append)
    assert seen, "no progress reported"
    assert seen[-1].regions == part.n_regions
    assert [p.regions for p in seen] == sorted(p.regions for p in seen)
    assert all(len(p.pending) == 3 for p in seen)
    assert any(sum(p.pending) > 0 for p in seen)  # small chunks: cells wait their turn
    assert seen[-1].elapsed >= seen[0].elapsed >= 0


def test_old_keyword_model_still_works_with_a_warning() -> None:
    net = mlp((6,), 2)
    with pytest.warns(DeprecationWarning, match="net="):
        part = partition(model=net, slice=BOX, device="cpu")
    with pytest.warns(DeprecationWarning, match="net="):
        assert part.verify(model=net, grid=16).ok


@pytest.mark.parametrize(
    ("states_up_to", "units", "offset"), [(2, 512, 0), (4, 3000, 17), (256, 70000, 5)]
)
def test_pattern_hash_products_are_exact(states_up_to: int, units: int, offset: int) -> None:
    """The float64 products of 16-bit limbs give the int64 hash bit for bit (mod 2**64),
    against plain wrapping int64 products and sums; one unit on hashes to its weights."""
    h = PatternHash(units + offset)
    g = torch.Generator().manual_seed(units)
    states = torch.randint(0, states_up_to, (257, units), generator=g, dtype=torch.uint8)
    states[0] = states_up_to - 1  # the largest sums
    got = h.of(states, offset, block=units * 50)  # several blocks of rows
    r = h.r[offset : offset + units]
    assert torch.equal(got, (states.to(torch.int64)[:, :, None] * r[None]).sum(1))
    one = torch.zeros((1, units), dtype=torch.uint8)
    one[0, 0] = 1
    assert torch.equal(h.of(one, offset)[0], h.r[offset])  # one unit on: its weights


def test_pattern_hash_weights_are_pinned_and_shared() -> None:
    """Stored hashes outlive versions: the weights of a size are the same numbers on every
    run (a pinned hash), shared by every hasher of that size, and a smaller network's are
    the first rows of a larger one's (the same random stream)."""
    states = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1]])
    got = PatternHash(20).of(states.to(torch.uint8))
    assert got.tolist() == [[-6024604697428484164, -1042530053065354861]]
    assert PatternHash(20).r is PatternHash(20).r
    assert torch.equal(PatternHash(7).r, PatternHash(20).r[:7])


@pytest.mark.parametrize(
    "layout",
    [
        [(0, 5, 1), (5, 7, 2), (12, 3, 1)],  # ReLU, 2-bit max-pool, ReLU
        [(0, 16, 1)],  # whole bytes
        [(0, 9, 1)],  # a partial last byte
        [(0, 3, 3), (3, 2, 1)],  # 3-bit units
        [],  # no units
    ],
)
def test_packing_on_the_device_gives_the_bytes_of_pack_patterns(
    layout: list[tuple[int, int, int]],
) -> None:
    """The descent packs finished chunks where it runs: the tensor path (GPUs), the NumPy
    path (CPUs) and ``pack_patterns`` write the same bytes, and they unpack back."""
    g = torch.Generator().manual_seed(len(layout))
    n_units = sum(c for _, c, _ in layout)
    states = torch.zeros((61, n_units), dtype=torch.uint8)
    for off, count, b in layout:
        states[:, off : off + count] = torch.randint(0, 2**b, (61, count), generator=g).to(
            torch.uint8
        )
    col = pack_patterns(states.numpy(), layout)
    want = np.frombuffer(col.buffers()[1], np.uint8).reshape(61, -1)
    for got in (pack_states(states, layout), _pack_bits(states, layout)):
        assert got.shape[1] == (sum(c * b for _, c, b in layout) + 7) // 8
        if got.shape[1]:
            np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_array_equal(unpack_patterns(got.numpy(), layout, n_units), states)


def test_states_of_a_fresh_partition_unpack_once_and_match_the_pattern_column() -> None:
    """``Partition.states`` is unpacked from the packed rows when first read, then kept
    (a write to it stays); the pattern column holds the same bits."""
    part = partition(ConvKinds(), digits_slice(), device="cpu")
    specs = part.model_summary["layers"]
    layout = [(s["unit_offset"], s["units"], s["bits"]) for s in specs]
    col = part.regions.column("pattern").combine_chunks()
    packed = np.frombuffer(col.buffers()[1], np.uint8).reshape(part.n_regions, -1)
    states = part.states
    assert states is not None and states.shape == (part.n_regions, part.model_summary["n_units"])
    np.testing.assert_array_equal(states, unpack_patterns(packed, layout, states.shape[1]))
    assert any(b > 1 for _, _, b in layout)  # max-pool units: 2-bit states
    states[0, 0] ^= 1
    assert part.states is states and part.states[0, 0] == states[0, 0]
