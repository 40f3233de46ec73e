"""The approximate local-complexity estimator of Humayun et al. in the full input space
(query 11), to compare with the exact slice measure of ``local_complexity``.

How it relates to the reference code (AhmedImtiazPrio/grok-adversarial, the code behind
"Deep networks always grok"), which hooks layers and compares ``torch.sign`` of their
outputs over the vertices of a cross-polytope:

- Which units: the reference sums over every hooked layer. For the MLP figures it hooks
  every ``nn.Linear``, the last one (the logits) included: that is ``layers="all"`` here.
  For the ResNet figures it hooks the batch norms, whose outputs are the ReLUs' inputs:
  ``layers="hidden"``. The default here is ``"hidden"``: the units that cut the input
  space into linear regions.
- An exact zero: ``torch.sign`` makes it a third state, so a unit that is exactly 0 at
  one vertex and negative at the others counts there (``zero="own_state"``). The default
  ``zero="off"`` uses the model's own activation pattern (ReLU: 0 is off), the convention
  of the partitions and of :func:`~geomstore.queries.local_complexity`.
- The reference's data loader drops the last partial batch (``drop_last=True``): those
  points silently get 0. Here every point is counted, whatever ``batch`` is.
- The reference's ``n`` counts vertices (``2 * directions``); its directions come from
  torch's orthogonal parametrisation of a random ``nn.Linear`` weight. Pass them as
  ``directions=`` (an array) to use exactly the same ones.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import torch

from geomstore.engine.graph import Program
from geomstore.queries.complexity import Layers, LCArgumentError, check_choice

__all__ = ["Zero", "approximate_lc"]

Zero = Literal["off", "own_state"]
"""How an exact zero counts: as the unit's off state, or as a state of its own."""
_ZERO: tuple[str, ...] = get_args(Zero)
_LAYERS: tuple[str, ...] = get_args(Layers)
_ON_ZERO = 1 << 16  # added to a unit's state where it sits exactly on a zero set


def approximate_lc(
    model: Any,
    x: np.ndarray,
    *,
    radius: float,
    directions: int | np.ndarray = 8,
    seed: int = 0,
    batch: int = 4096,
    layers: Layers = "hidden",
    zero: Zero = "off",
) -> pa.Table:
    """Units whose state is not constant over a cross-polytope around each input.

    The cross-polytope has the ``2 P`` vertices ``x +/- radius * v_i``. A unit counts when
    its state differs between two vertices; the model runs in float64.

    Parameters
    ----------
    model : torch.nn.Module or torch.export.ExportedProgram
        A network of affine layers and piecewise-linear activations, in eval mode.
    x : array (n, *input_shape)
        The inputs.
    radius : float
        Distance of each vertex from its input.
    directions : int or array (P, *input_shape)
        The number P of orthonormal random directions (QR of a Gaussian matrix, reproducible
        from ``seed``; at most the input size), or the directions themselves, one per row
        (each is scaled to length ``radius``, as the reference code does).
    seed : int
        Seed of the random directions.
    batch : int
        Vertices per forward pass (memory only: every input is counted).
    layers : {"hidden", "all"}
        ``"hidden"`` counts the units of the nonlinearities. ``"all"`` also counts the
        model's output units (the logits) by their sign, as the reference code does for
        the MLP curves of the paper; ``neurons_per_layer`` then has one more entry.
    zero : {"off", "own_state"}
        ``"off"``: a unit's state is the model's own (ReLU: ``pre > 0``). ``"own_state"``:
        a unit exactly on its zero set (an output exactly 0) is in a state of its own, as
        with the reference's ``torch.sign``.

    Returns
    -------
    pyarrow.Table
        point_id, n_neurons and neurons_per_layer (list, one entry per nonlinearity, then
        the output layer with ``layers="all"``).

    Examples
    --------
    >>> import numpy as np, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    >>> x = np.zeros((5, 2))
    >>> t = approximate_lc(net, x, radius=0.5, directions=np.eye(2), layers="all")
    >>> t.num_rows, len(t.column("neurons_per_layer")[0])
    (5, 2)
    """
    check_choice("layers", layers, _LAYERS)
    check_choice("zero", zero, _ZERO)
    try:
        xs = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise LCArgumentError("x must be an array of inputs, shape (n, *input_shape).") from exc
    if xs.ndim < 2 or not np.all(np.isfinite(xs)):
        raise LCArgumentError("x must hold a batch of finite inputs: shape (n, *input_shape).")
    if not (isinstance(radius, (int, float, np.floating)) and np.isfinite(radius) and radius > 0):
        raise LCArgumentError(f"radius must be a finite number > 0; got {radius!r}.")
    if not (isinstance(batch, (int, np.integer)) and batch > 0):
        raise LCArgumentError(f"batch must be a positive integer; got {batch!r}.")
    n, shape = xs.shape[0], xs.shape[1:]
    dim = int(np.prod(shape))
    offsets = _directions(directions, dim, seed) * float(radius)  # (P, dim)
    verts_per = 2 * len(offsets)
    offsets = np.concatenate([offsets, -offsets])  # the reference's order: +v_i, then -v_i
    program = Program(model, tuple(shape), torch.device("cpu"))
    n_layers = len(program.nonlinearities) + (layers == "all")
    counts = np.zeros((n, n_layers), dtype=np.int64)
    per = max(1, batch // verts_per)
    for lo in range(0, n, per):
        chunk = xs[lo : lo + per].reshape(-1, dim)
        verts = (chunk[:, None, :] + offsets[None]).reshape(-1, *shape)
        with torch.no_grad():
            out, pres = program.forward_with_pre(torch.as_tensor(verts))
        states = [
            _states(spec, pre, zero) for spec, pre in zip(program.nonlinearities, pres, strict=True)
        ]
        if layers == "all":
            states.append(_output_states(out.reshape(len(verts), -1), zero))
        for layer, st in enumerate(states):
            st = st.reshape(len(chunk), verts_per, -1)
            varies = (st != st[:, :1]).any(dim=1)
            counts[lo : lo + len(chunk), layer] = varies.sum(dim=1).numpy()
    return pa.table(
        {
            "point_id": np.arange(n, dtype=np.int64),
            "n_neurons": counts.sum(1),
            "neurons_per_layer": pa.ListArray.from_arrays(
                pa.array(np.arange(n + 1, dtype=np.int32) * n_layers),
                pa.array(counts.reshape(-1)),
            ),
        }
    )


def _directions(directions: int | np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Unit directions (P, dim): P random orthonormal ones, or the given rows normalised."""
    if isinstance(directions, (int, np.integer)) and not isinstance(directions, bool):
        if not 1 <= directions <= dim:
            raise LCArgumentError(
                f"directions must lie in [1, {dim}] (the input size); got {directions}."
            )
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(dim, int(directions))))
        return np.ascontiguousarray(q.T)
    try:
        v = np.asarray(directions, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise LCArgumentError("directions must be an int or an array of directions.") from exc
    if v.ndim < 1 or v.size == 0 or v.size % dim or not np.all(np.isfinite(v)):
        raise LCArgumentError(
            f"directions must be an int or a finite array (P, *input_shape) of P >= 1 "
            f"directions of size {dim}; got shape {v.shape}."
        )
    v = v.reshape(-1, dim)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    if np.any(norm == 0):
        raise LCArgumentError("directions must be non-zero vectors; drop the zero rows.")
    return v / norm


def _states(spec: Any, pre: torch.Tensor, zero: str) -> torch.Tensor:
    """Each unit's state at each vertex; with "own_state" a unit on a zero set is apart."""
    st = spec.states_from_values(pre).to(torch.int64)
    if zero == "own_state":
        st = st + _ON_ZERO * (spec.margins(pre) == 0).to(torch.int64)
    return st


def _output_states(out: torch.Tensor, zero: str) -> torch.Tensor:
    """Output units' states: positive or not, or with "own_state" the sign (0 apart)."""
    if zero == "own_state":
        return torch.sign(out).to(torch.int64)
    return (out > 0).to(torch.int64)
