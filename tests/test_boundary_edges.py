"""Decision boundary that lies on an edge between regions (a tie along a ReLU hinge)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from geomstore import Slice, partition

BOX = Slice.box((-1.0, -1.0), (1.0, 1.0))


def _net(out_w: list[list[float]], out_b: list[float]) -> nn.Sequential:
    """Hidden units relu(u0), relu(-u0), relu(u1 + 0.5); outputs given by hand."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, len(out_b))).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
        net[2].weight.copy_(torch.tensor(out_w))
        net[2].bias.copy_(torch.tensor(out_b))
    return net.eval()


def _segments(part: object) -> np.ndarray:
    bd = part.boundary  # type: ignore[attr-defined]
    return np.stack([np.asarray(bd.column(c)) for c in ("u0_a", "u1_a", "u0_b", "u1_b")], 1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_tie_along_a_hinge_is_boundary(sign: float) -> None:
    # logits +-(relu(u0) - relu(-u0)) = +-u0: the classes swap exactly on the hinge u0 = 0
    net = _net([[sign, -sign, 0.0], [-sign, sign, 0.0]], [0.0, 0.0])
    part = partition(net, BOX, device="cpu")
    seg = _segments(part)
    assert len(seg) >= 1 and np.allclose(seg[:, [0, 2]], 0.0, atol=1e-12)
    assert np.isclose(np.abs(seg[:, 3] - seg[:, 1]).sum(), 2.0)  # the whole hinge, once
    bd = part.boundary
    assert set(bd.column("class_a").to_pylist()) == {0}
    assert set(bd.column("class_b").to_pylist()) == {1}
    # each segment's normal points towards class_b
    probe = torch.tensor([[0.5, 0.0], [-0.5, 0.0]], dtype=torch.float64)
    right_class = int(net(probe)[0].argmax())
    normal_u0 = np.asarray(bd.column("normal_u0"))
    assert ((normal_u0 > 0) == (right_class == 1)).all()
    report = part.verify(net, grid=32)
    assert report.ok and any(c.name == "decision boundary" for c in report.checks), str(report)


def test_a_touching_tie_without_a_class_change_is_not_boundary() -> None:
    # logit0 - logit1 = |u0| >= 0: a tie on the hinge, but class 0 wins on both sides
    net = _net([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [0.0, 0.0])
    part = partition(net, BOX, device="cpu")
    assert part.boundary.num_rows == 0
    assert part.verify(net, grid=32).ok


def test_three_classes_and_a_level_set_on_a_hinge() -> None:
    # class 2 is never on top; 0 and 1 swap on u0 = 0, and the hinge u1 = -0.5 is no boundary
    net = _net([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, -0.5]], [0.0, 0.0, -3.0])
    part = partition(net, BOX, device="cpu")
    seg = _segments(part)
    assert np.allclose(seg[:, [0, 2]], 0.0, atol=1e-12)
    assert np.isclose(np.abs(seg[:, 3] - seg[:, 1]).sum(), 2.0)
    assert part.verify(net, grid=32).ok
    # one output: its zero level set is the hinge u0 = 0
    one = _net([[1.0, -1.0, 0.0]], [0.0])
    lv = partition(one, BOX, device="cpu")
    seg = _segments(lv)
    assert np.allclose(seg[:, [0, 2]], 0.0, atol=1e-12)
    assert np.isclose(np.abs(seg[:, 3] - seg[:, 1]).sum(), 2.0)
    assert lv.verify(one, grid=32).ok


def test_random_networks_gain_no_edge_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """On generic weights no tie holds along an edge: the table is the interior pass's."""
    from geomstore.engine import tables as part_mod

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    net = net.double().eval()
    calls: list[int] = []
    real = part_mod.edge_boundary

    def spy(*args: object, **kwargs: object) -> dict[str, np.ndarray]:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(len(out["region"]))
        return out

    monkeypatch.setattr(part_mod, "edge_boundary", spy)
    part = partition(net, Slice.box((-3.0, -3.0), (3.0, 3.0)), device="cpu")
    assert calls and sum(calls) == 0 and part.boundary.num_rows > 0
    assert part.verify(net, grid=48).ok
