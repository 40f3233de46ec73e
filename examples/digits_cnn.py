"""Example (b): a small CNN (conv, batch norm, max-pooling) trained on scikit-learn's
8x8 digits, and its exact partition of the plane through three digit images.

    python examples/digits_cnn.py [--out examples-out/digits] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import geomstore
from geomstore import plot


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    ap.add_argument("--out", type=Path, default=Path("examples-out/digits"))
    ap.add_argument("--quick", action="store_true", help="fewer epochs (a smoke test)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = digits.target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    X, Y = torch.tensor(x), torch.tensor(y)
    for _ in range(3 if args.quick else 25):
        for batch in np.array_split(rng.permutation(train), 22):
            opt.zero_grad()
            nn.functional.cross_entropy(net(X[batch]), Y[batch]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(X[test]).argmax(1) == Y[test]).float().mean())
    print(f"test accuracy {acc:.3f}")

    # the plane through a 0, a 1 and a 7 from the test set
    picks = [int(test[np.flatnonzero(y[test] == d)[0]]) for d in (0, 1, 7)]
    plane = geomstore.Slice.through(
        *(x[i].astype(np.float64) for i in picks),
        margin=0.05 if args.quick else 0.3,
        name="digits-0-1-7",
    )
    part = geomstore.partition(net, plane)
    print(f"{part.n_regions} regions in {part.seconds:.2f} s on {part.settings['device']}")
    report = part.verify(net)
    print(report)
    with geomstore.open(args.out / "store") as store:
        store.add(
            part,
            model="digits-cnn",
            checkpoint="final",
            metrics={"test_acc": acc},
            verified=report.ok,
        )
        store.add_points("digits-test", plane, x[test], labels=y[test], split="test")
        near = store.sql(
            "SELECT label, count(*) AS n, avg(distance) AS mean_distance FROM points "
            "GROUP BY label ORDER BY label"
        ).table
        print("test digits projected onto the plane (distance to it):")
        for r in near.to_pylist():
            print(f"  digit {r['label']}: {r['n']} images, mean distance {r['mean_distance']:.2f}")
    u, _ = plane.project(x[picks].reshape(3, -1).astype(np.float64))
    pts = (u, y[picks])
    for color in ("class", "slope"):
        print(
            "wrote",
            plot.draw_partition(
                part,
                args.out / f"plane-{color}.png",
                color=color,
                points=pts,
                title="CNN on the plane through 0, 1, 7",
            ),
        )
    if not report.ok:
        raise SystemExit("verification failed")


if __name__ == "__main__":
    main()
