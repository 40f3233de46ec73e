"""Max-pool tournaments that hand their last rounds to the host (as a GPU run does).

On a GPU, :func:`geomstore.engine.tournaments.split_max` moves a layer's remaining
polygons to the CPU once few (polygon, test) pairs are left, and puts their pieces back.
Here the hand-off is forced on the CPU, where it must give the partition of the rounds
that never hand off, bit for bit: the same polygons in the same rows, the same cut ids.
"""

from __future__ import annotations

import pytest
import torch

from geomstore import partition
from geomstore.engine import tournaments
from tests.nets import ConvKinds, digits_slice
from tests.test_split import _PoolNet


def _nets() -> list[tuple[str, torch.nn.Module, object]]:
    torch.manual_seed(0)
    return [
        ("pool", _PoolNet().eval(), digits_slice(0)),
        ("kinds0", ConvKinds(0).eval(), digits_slice(0)),
        ("kinds1", ConvKinds(1).eval(), digits_slice(1)),
    ]


NETS = _nets()


@pytest.mark.parametrize("tail", [1 << 30, 300, 30])
@pytest.mark.parametrize("case", range(len(NETS)), ids=[n for n, _, _ in NETS])
def test_rounds_finished_on_the_host_give_the_same_partition_bit_for_bit(
    case: int, tail: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, net, sl = NETS[case]
    ref = partition(net, sl, device="cpu")  # the CPU never hands off by itself
    handoffs: list[tuple[int, bool]] = []
    finish = tournaments._finish_on_host

    def spy(spec, buf, cross, pairs, *rest):  # type: ignore[no-untyped-def]
        cells = int(buf.cell[: buf.count].max()) + 1  # the layer's cells: rows 0 .. cells - 1
        handoffs.append((int(pairs[0].shape[0]), buf.count > cells))
        return finish(spec, buf, cross, pairs, *rest)

    monkeypatch.setattr(tournaments, "_tail_to_host", lambda device: True)
    monkeypatch.setattr(tournaments, "HOST_TAIL_PAIRS", tail)
    monkeypatch.setattr(tournaments, "_finish_on_host", spy)
    got = partition(net, sl, device="cpu")
    assert handoffs and all(t <= tail for t, _ in handoffs)
    assert got.regions.equals(ref.regions)
    assert got.edges.equals(ref.edges)
    assert got.boundary.equals(ref.boundary)
    # every layer whole on the host; at 30 pairs, some layer's tail after device rounds
    mids = [mid for _, mid in handoffs]
    assert not any(mids) if tail == 1 << 30 else (any(mids) or tail != 30)
    assert got.verify(net, grid=32).ok


def test_only_a_gpu_hands_its_tail_to_the_host() -> None:
    assert not tournaments._tail_to_host(torch.device("cpu"))
    assert tournaments._tail_to_host(torch.device("cuda"))
    assert tournaments.HOST_TAIL_PAIRS > 0
