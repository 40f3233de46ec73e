"""The approximate local-complexity estimator of Humayun et al. in the full input space
(query 10), to compare with the exact slice measure of ``local_complexity``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from geomstore.engine.graph import Program
from geomstore.errors import GeomstoreError

__all__ = ["approximate_lc"]


def approximate_lc(
    model: Any,
    x: np.ndarray,
    *,
    radius: float,
    directions: int = 8,
    seed: int = 0,
    batch: int = 4096,
) -> pa.Table:
    """Neurons whose state is not constant over a cross-polytope around each input.

    The cross-polytope has vertices ``x +/- radius * v_i`` for ``directions`` orthonormal
    random directions ``v_i`` (QR of a Gaussian matrix, reproducible from ``seed``). A unit
    counts when its state (as in the activation pattern) differs between two vertices.

    Parameters
    ----------
    x : array (n, *input_shape)
        The inputs.

    Returns
    -------
    pyarrow.Table with point_id, n_neurons and neurons_per_layer (list).
    """
    xs = np.asarray(x, dtype=np.float64)
    if xs.ndim < 2:
        raise GeomstoreError("x must hold a batch of inputs: shape (n, *input_shape).")
    n, shape = xs.shape[0], xs.shape[1:]
    dim = int(np.prod(shape))
    if not 1 <= directions <= dim:
        raise GeomstoreError(f"directions must lie in [1, {dim}] (the input size).")
    if not radius > 0:
        raise GeomstoreError(f"radius must be > 0; got {radius!r}.")
    program = Program(model, tuple(shape), torch.device("cpu"))
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, directions)))
    offsets = np.concatenate([q.T, -q.T]) * radius  # (2P, dim)
    counts = np.zeros((n, len(program.nonlinearities)), dtype=np.int64)
    per = max(1, batch // (2 * directions))
    for lo in range(0, n, per):
        chunk = xs[lo : lo + per].reshape(-1, dim)
        verts = (chunk[:, None, :] + offsets[None]).reshape(-1, *shape)
        with torch.no_grad():
            _, pres = program.forward_with_pre(torch.as_tensor(verts))
        for layer, (spec, pre) in enumerate(zip(program.nonlinearities, pres, strict=True)):
            st = spec.states_from_values(pre).reshape(len(chunk), 2 * directions, -1)
            varies = (st != st[:, :1]).any(dim=1)
            counts[lo : lo + len(chunk), layer] = varies.sum(dim=1).numpy()
    return pa.table(
        {
            "point_id": np.arange(n, dtype=np.int64),
            "n_neurons": counts.sum(1),
            "neurons_per_layer": pa.array(counts.tolist(), type=pa.list_(pa.int64())),
        }
    )
