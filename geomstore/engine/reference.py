"""An independent, slow, exact-enough partition for small 2-input ReLU MLPs.

It shares no code with the engine: it reads the weight matrices of an
``nn.Sequential`` of ``Linear`` and ``ReLU`` layers, composes the affine maps with
numpy, and cuts shapely polygons with half-planes, one region at a time. Used by
``verify()`` (check 5) and by the tests to count regions independently.
"""

from __future__ import annotations

import numpy as np
import shapely
from torch import nn

from geomstore.slice import Slice

__all__ = ["is_plain_relu_mlp", "reference_regions"]


def is_plain_relu_mlp(model: object) -> bool:
    """True for ``nn.Sequential(Linear, ReLU, ..., Linear)`` on 2 inputs."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return False
    mods = list(model)
    if not all(isinstance(m, (nn.Linear, nn.ReLU)) for m in mods):
        return False
    first = mods[0]
    return isinstance(first, nn.Linear) and first.in_features == 2


def _halfplane(
    a: np.ndarray, b: float, big: float, positive: bool, centre: np.ndarray
) -> shapely.Polygon:
    """The half-plane {u : a.u + b >= 0} (or <= 0) as a polygon covering the domain.

    Built around the projection of the domain's centre onto the line, ``big`` + the
    centre's distance to the line deep and wide, so that it holds the whole domain.
    """
    sgn = 1.0 if positive else -1.0
    a, b = a * sgn, b * sgn
    norm = float(np.hypot(a[0], a[1]))
    nrm = a / norm
    dist = abs(float(a @ centre + b)) / norm
    p0 = centre - (a @ centre + b) / norm * nrm
    big = big + dist
    d = np.array([-nrm[1], nrm[0]])
    pts = [p0 + big * d, p0 - big * d, p0 - big * d + 2 * big * nrm, p0 + big * d + 2 * big * nrm]
    return shapely.Polygon(pts)


def reference_regions(
    model: nn.Sequential, slice_: Slice, *, min_area: float = 1e-14
) -> list[tuple[shapely.Polygon, tuple[int, ...]]]:
    """Regions as (polygon, activation pattern) for a plain ReLU MLP on a box slice.

    Pieces of area ``min_area * slice_.area`` or less are dropped: shapely's overlay is
    not exact, so smaller ones are below what this reference can tell from noise.
    """
    min_area = min_area * slice_.area
    big = 10.0 * (1.0 + slice_.diameter)
    centre = slice_.domain.mean(axis=0)
    regions: list[tuple[shapely.Polygon, np.ndarray, np.ndarray, tuple[int, ...]]] = [
        (shapely.Polygon(slice_.domain), np.eye(2), np.zeros(2), ())
    ]
    layers = list(model)
    i = 0
    while i < len(layers):
        lin = layers[i]
        assert isinstance(lin, nn.Linear)
        relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
        w = lin.weight.detach().double().numpy()
        bias = lin.bias.detach().double().numpy() if lin.bias is not None else np.zeros(w.shape[0])
        if not relu:
            break
        new = []
        for poly, m, c, pat in regions:
            pre_m, pre_c = w @ m, w @ c + bias
            pieces: list[tuple[shapely.Polygon, tuple[int, ...]]] = [(poly, ())]
            for j in range(w.shape[0]):
                nxt = []
                for piece, bits in pieces:
                    a = pre_m[j]
                    if np.hypot(a[0], a[1]) == 0:
                        nxt.append((piece, (*bits, int(pre_c[j] > 0))))
                        continue
                    for positive in (True, False):
                        part = piece.intersection(_halfplane(a, pre_c[j], big, positive, centre))
                        if part.area > min_area:
                            nxt.append((part, (*bits, int(positive))))
                pieces = nxt
            for piece, bits in pieces:
                mask = np.array(bits, dtype=float)
                new.append((piece, mask[:, None] * pre_m, mask * pre_c, pat + bits))
        regions = new
        i += 2
    return [(poly, pat) for poly, _, _, pat in regions]
