"""Example (c): a 2-D implicit neural representation (an MLP from pixel coordinates to
intensity) of a small image, and the exact level sets of its output.

    python examples/inr_levelsets.py [--out examples-out/inr] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

import geomstore
from geomstore import plot


def smiley(n: int = 32) -> np.ndarray:
    """A small grey-scale image in [0, 1]: a face with eyes and a smile."""
    v = np.linspace(-1, 1, n)
    xx, yy = np.meshgrid(v, -v)
    r = np.hypot(xx, yy)
    img = np.where(r < 0.85, 0.6, 0.0)
    img = np.where(np.hypot(xx + 0.32, yy - 0.3) < 0.14, 1.0, img)
    img = np.where(np.hypot(xx - 0.32, yy - 0.3) < 0.14, 1.0, img)
    mouth = (np.abs(np.hypot(xx, yy + 0.05) - 0.45) < 0.08) & (yy < -0.15)
    return np.where(mouth, 0.0, img)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    ap.add_argument("--out", type=Path, default=Path("examples-out/inr"))
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke test)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    img = smiley(32)
    v = np.linspace(-1, 1, img.shape[0])
    xx, yy = np.meshgrid(v, -v)
    coords = torch.tensor(np.stack([xx.ravel(), yy.ravel()], 1), dtype=torch.float32)
    target = torch.tensor(img.ravel(), dtype=torch.float32)[:, None]
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(2, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 1),
    )
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(300 if args.quick else 3000):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(coords), target)
        loss.backward()
        opt.step()
    mse = loss.item()
    print(f"fit: mean squared error {mse:.4f}")
    net.eval()
    levels = [0.3, 0.8]
    plane = geomstore.Slice.box((-1, -1), (1, 1), name="image-plane")
    part = geomstore.partition(net, plane, levels=levels)
    print(f"{part.n_regions} regions, {part.boundary.num_rows} level-set segments")
    report = part.verify(net, brute_force=False)  # the shapely brute force takes minutes here
    print(report)
    with geomstore.open(args.out / "store") as store:
        store.add(part, model="inr-smiley", checkpoint="final", metrics={"mse": mse})
        lengths = store.sql(
            "SELECT level, count(*) AS segments, sum(length) AS length FROM boundary "
            "GROUP BY level ORDER BY level"
        ).table
    for r in lengths.to_pylist():
        print(f"level {r['level']}: {r['segments']} segments, length {r['length']:.3f}")
    print(
        "wrote",
        plot.draw_partition(
            part, args.out / "inr-slope.png", title="INR of a 32x32 image: level sets 0.3 and 0.8"
        ),
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 4), dpi=110, layout="constrained")
    ax[0].imshow(img, cmap="gray", extent=(-1, 1, -1, 1))
    ax[0].set_title("the image")
    with torch.no_grad():
        ax[1].imshow(net(coords).reshape(img.shape).numpy(), cmap="gray", extent=(-1, 1, -1, 1))
    b = part.boundary
    for a0, a1, b0, b1 in zip(*(b.column(c).to_numpy() for c in ("u0_a", "u1_a", "u0_b", "u1_b"))):
        ax[1].plot([a0, b0], [a1, b1], color="red", lw=1)
    ax[1].set_title("the network, with its exact level sets")
    fig.savefig(args.out / "inr-levels.png")
    print("wrote", args.out / "inr-levels.png")
    if not report.ok:
        raise SystemExit("verification failed")


if __name__ == "__main__":
    main()
