"""Pictures: the class colouring is the model's argmax; files are written in each format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
import torch

import geomstore
from geomstore import plot
from tests.nets import BOX, mlp


@pytest.mark.parametrize(("out", "threshold"), [(3, 0.0), (1, 0.0), (1, 0.3)])
def test_class_pieces_tile_the_domain_with_the_models_argmax(out: int, threshold: float) -> None:
    net = mlp((12, 12), out, seed=2)
    part = geomstore.partition(net, BOX, device="cpu", threshold=threshold)
    rings, labels = plot.class_pieces(part)
    polys = np.array([shapely.Polygon(r) for r in rings])
    assert abs(shapely.area(polys).sum() - 4.0) < 1e-9
    pts = shapely.point_on_surface(polys)
    xy = np.stack([shapely.get_x(pts), shapely.get_y(pts)], 1)
    with torch.no_grad():
        y = net(torch.tensor(xy, dtype=torch.float32)).double().numpy()
    want = y.argmax(1) if out > 1 else (y[:, 0] > threshold).astype(int)
    margin = np.sort(y, 1)[:, -1] - np.sort(y, 1)[:, -2] if out > 1 else np.abs(y[:, 0] - threshold)
    clear = margin > 1e-4  # float32 forward: skip points within rounding of a tie
    assert clear.mean() > 0.9
    assert (labels[clear] == want[clear]).all()
    if out == 1:
        assert len(set(labels.tolist())) == 2 or part.boundary.num_rows == 0


def test_region_lc_counts_neurons_near_each_centroid() -> None:
    part = geomstore.partition(mlp((6,), 2, seed=0), BOX, device="cpu")
    lc = plot.region_lc(part, radius=10.0)  # the whole box: every neuron that cuts it
    cutting = {u for u in part.edges.column("unit").to_pylist() if u is not None}
    assert (lc == len(cutting)).all()
    assert plot.region_lc(part, radius=1e-9).max() == 0  # centroids lie off every edge


def test_pictures_in_every_format(tmp_path: Path) -> None:
    parts = [geomstore.partition(mlp((8, 8), 3, seed=s), BOX, device="cpu") for s in range(3)]
    for name, color in (("a.png", "slope"), ("b.svg", "class"), ("c.pdf", "lc")):
        assert plot.draw_partition(parts[0], tmp_path / name, color=color).stat().st_size > 5_000
    assert plot.small_multiples(parts, tmp_path / "g.png").stat().st_size > 10_000
    from PIL import Image

    assert Image.open(plot.animate(parts, tmp_path / "r.gif")).n_frames == 3
    with pytest.raises(geomstore.GeomstoreError, match="color must be one of"):
        plot.draw_partition(parts[0], tmp_path / "x.png", color="rainbow")
