"""The model zoo of benchmarks/zoo.py: the networks researchers bring, at their real sizes."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NETS", "VGG11", "LeNet5", "MaxoutMLP", "ResNetCifar", "inr", "resnet18", "resnet20"]


class LeNet5(nn.Module):
    """LeNet-5 on 1x28x28 (ReLU and max pooling in place of tanh and subsampling)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5, padding=2)
        self.c2 = nn.Conv2d(6, 16, 5)
        self.f1, self.f2, self.f3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        return self.f3(F.relu(self.f2(F.relu(self.f1(h.flatten(1))))))


class BasicBlock(nn.Module):
    """He et al. 2016's basic block (projection shortcut when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNetCifar(nn.Module):
    """A CIFAR ResNet: 3x3 stem, stages of basic blocks, nn.AdaptiveAvgPool2d(1) head."""

    def __init__(
        self, widths: tuple[int, ...], blocks: int, classes: int = 10, in_ch: int = 3
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet20() -> ResNetCifar:
    """ResNet-20 for CIFAR: widths 16-32-64, three stages of three basic blocks."""
    return ResNetCifar((16, 32, 64), 3)


def resnet18() -> ResNetCifar:
    """ResNet-18 adapted to CIFAR: 3x3 stem, no stem max-pool, 64-128-256-512 x 2 blocks."""
    return ResNetCifar((64, 128, 256, 512), 2)


class VGG11(nn.Module):
    """A VGG-11-style CIFAR net: conv-BN-ReLU, MaxPool2d, one linear classifier."""

    cfg = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in self.cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(512, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


class MaxoutMLP(nn.Module):
    """A maxout MLP on 1x28x28 written as researchers write it: view + amax."""

    def __init__(self, widths: tuple[int, ...] = (64, 64), pieces: int = 4) -> None:
        super().__init__()
        self.pieces = pieces
        dims = [784, *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b * pieces) for a, b in itertools.pairwise(dims))
        self.head = nn.Linear(dims[-1], 10)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for lin in self.layers:
            z = lin(h)
            h = z.view(z.shape[0], -1, self.pieces).amax(-1)
        return self.head(h)


def inr() -> nn.Sequential:
    """A 2-D ReLU implicit representation, 2-256x4-3 (an image's RGB from its coordinates)."""
    layers: list[nn.Module] = []
    d = 2
    for _ in range(4):
        layers += [nn.Linear(d, 256), nn.ReLU()]
        d = 256
    layers.append(nn.Linear(d, 3))
    return nn.Sequential(*layers)


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Random batch-norm statistics, as after training, so that units do not all agree."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model.eval()


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A zoo network with fixed weights (seed 0) and its input shape."""
    torch.manual_seed(0)
    model, shape = NETS[name]()
    return _randomise_bn(model, 0), shape


NETS = {
    "lenet5": lambda: (LeNet5(), (1, 28, 28)),
    "resnet20": lambda: (resnet20(), (3, 32, 32)),
    "vgg11": lambda: (VGG11(), (3, 32, 32)),
    "resnet18": lambda: (resnet18(), (3, 32, 32)),
    "maxout-mlp": lambda: (MaxoutMLP(), (1, 28, 28)),
    "inr-2-256x4-3": lambda: (inr(), (2,)),
    "resnet-digits": lambda: (ResNetCifar((8, 16), 1, in_ch=1), (1, 8, 8)),
}
