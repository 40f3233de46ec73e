"""Canonical small networks and slices, reused by every test."""

from __future__ import annotations

import torch
from torch import nn

from geomstore import Slice

BOX = Slice.box((-1.0, -1.0), (1.0, 1.0), name="box")


def mlp(
    widths: tuple[int, ...],
    out: int = 1,
    *,
    act: type[nn.Module] = nn.ReLU,
    seed: int = 0,
    **act_kw: object,
) -> nn.Sequential:
    """A seeded, PyTorch-default-initialised MLP on 2 inputs."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = 2
    for w in widths:
        layers += [nn.Linear(d, w), act(**act_kw)]
        d = w
    layers.append(nn.Linear(d, out))
    return nn.Sequential(*layers).eval()


class Residual(nn.Module):
    """x -> relu(W1 x) -> h + relu(W2 h) -> concat with a skip branch -> logits."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(2, 12)
        self.block = nn.Linear(12, 12)
        self.skip = nn.Linear(2, 4)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = h + nn.functional.relu(self.block(h))
        s = nn.functional.leaky_relu(self.skip(x), 0.1)
        return self.head(torch.cat([h, s], dim=1))


class SmallCNN(nn.Module):
    """conv -> batch norm -> relu -> max-pool -> conv -> abs -> avg-pool -> linear."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(16, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.bn(self.conv1(x))))
        h = self.avg(torch.abs(self.conv2(h)))
        return self.fc(h.flatten(1))


class ConvKinds(nn.Module):
    """conv, relu, conv, per-channel PReLU, max-pool, conv, hard-tanh, linear, leaky, linear."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.prelu = nn.PReLU(3)
        self.conv3 = nn.Conv2d(3, 2, 3)
        self.tanh = nn.Hardtanh(-0.12, -0.07)
        self.fc = nn.Linear(2 * 2 * 2, 6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            self.prelu.weight.copy_(torch.tensor([-0.5, 0.1, 0.4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prelu(self.conv2(torch.relu(self.conv1(x))))
        h = self.tanh(self.conv3(nn.functional.max_pool2d(h, 2)))
        return self.head(nn.functional.leaky_relu(self.fc(h.flatten(1)), 0.3))


def digits_slice(seed: int = 0) -> Slice:
    """A plane through three random 8x8 'images'."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.rand((1, 8, 8), generator=g, dtype=torch.float64) for _ in range(3))
    return Slice.through(a.numpy(), b.numpy(), c.numpy(), margin=0.1, name="digits")


def factory_mlp() -> nn.Sequential:
    """A no-argument factory (for --factory tests.nets:factory_mlp): 2-16-16-3."""
    return mlp((16, 16), 3, seed=0)
