"""``partition(model, slice)``: the exact tiling of a slice by a network, as Arrow tables."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from geomstore.engine.descent import Descent
from geomstore.engine.graph import Program
from geomstore.engine.tables import (
    boundary_segments,
    edge_overlay,
    polygon_measures,
    table_regions,
    table_segments,
)
from geomstore.errors import GeomstoreError, ModelShapeError
from geomstore.slice import Slice

__all__ = ["ENGINE_VERSION", "Partition", "partition", "resolve_device"]

ENGINE_VERSION = "1"
DEFAULT_TOL = 1e-10


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other values are checked.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device in ("cpu", "cuda") or str(device).startswith("cuda:"):
        dev = torch.device(device)
    else:
        raise GeomstoreError(f"device must be one of 'auto', 'cpu', 'cuda[:N]'; got {device!r}.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GeomstoreError("device 'cuda' was asked for but CUDA is not available; use 'auto'.")
    return dev


def _pack_patterns(states: np.ndarray, bits: list[tuple[int, int, int]]) -> pa.Array:
    """Pack unit states into bytes; ``bits`` holds (unit_offset, n_units, bits_per_unit)."""
    if bits and all(b == 1 for _, _, b in bits) and sum(c for _, c, _ in bits) == states.shape[1]:
        return _fixed_binary(np.packbits(states, axis=1), states.shape[0])  # ReLU-only nets
    cols = []
    for off, count, b in bits:
        s = states[:, off : off + count]
        for j in range(b - 1, -1, -1) if b > 1 else [0]:
            cols.append(((s >> j) & 1).astype(bool) if b > 1 else s.astype(bool))
        if b > 1:
            # interleave so that each unit's bits stay together (MSB first)
            block = np.stack(cols[-b:], axis=2).reshape(s.shape[0], -1)
            del cols[-b:]
            cols.append(block)
    mat = np.concatenate(cols, axis=1) if cols else np.zeros((states.shape[0], 0), bool)
    return _fixed_binary(np.packbits(mat, axis=1), states.shape[0])


def _fixed_binary(packed: np.ndarray, rows: int) -> pa.Array:
    if packed.shape[1] == 0:
        packed = np.zeros((rows, 1), np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(packed.shape[1]), rows, [None, pa.py_buffer(packed.tobytes())]
    )


@dataclass
class Partition:
    """The exact partition of one slice by one network.

    Attributes
    ----------
    regions, edges, boundary : pyarrow.Table
        See ``docs/tables.md`` for every column. Geometry columns hold WKB in slice
        coordinates ``u``.
    slice : Slice
    model_summary : dict
        Layers, units per layer, input shape and number of outputs.
    settings : dict
        Tolerance, device and boundary options the partition was computed with.
    """

    regions: pa.Table
    edges: pa.Table
    boundary: pa.Table
    slice: Slice
    model_summary: dict[str, Any]
    settings: dict[str, Any]
    seconds: float
    states: np.ndarray = field(repr=False)
    program: Program | None = field(default=None, repr=False)

    @property
    def n_regions(self) -> int:
        """Number of regions."""
        return self.regions.num_rows

    def affine_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """Every region's output map in slice coordinates: A (P, K, 2) and c (P, K)."""
        k = self.model_summary["n_outputs"]
        a = self.regions.column("A").combine_chunks().flatten().to_numpy().reshape(-1, k, 2)
        c = self.regions.column("c").combine_chunks().flatten().to_numpy().reshape(-1, k)
        return a, c

    def polygons(self) -> np.ndarray:
        """Regions as shapely polygons."""
        import shapely

        return shapely.from_wkb(self.regions.column("geometry").to_numpy(zero_copy_only=False))

    def verify(self, model: Any = None, *, grid: int = 96, brute_force: bool = True) -> Any:
        """Run the exactness checks of design.md section 3; see :func:`geomstore.verify`."""
        from geomstore.engine.verify import verify

        return verify(self, model=model, grid=grid, brute_force=brute_force)

    def __repr__(self) -> str:
        return (
            f"Partition(regions={self.n_regions}, edges={self.edges.num_rows}, "
            f"boundary={self.boundary.num_rows}, "
            f"slice={self.slice.name or self.slice.content_hash[:8]}, seconds={self.seconds:.3f})"
        )


def partition(
    model: Any,
    slice: Slice,
    *,
    device: str | torch.device = "auto",
    tol: float = DEFAULT_TOL,
    threshold: float = 0.0,
    levels: Sequence[float] | None = None,
    output: int = 0,
    chunk_elements: int = 1 << 24,
    progress: Callable[[int], None] | None = None,
) -> Partition:
    """Compute every linear region of ``model`` on ``slice``, exactly, in float64.

    Parameters
    ----------
    model : torch.nn.Module or torch.export.ExportedProgram
        A network of affine layers and piecewise-linear activations, in eval mode.
    slice : Slice
        The plane and its convex domain.
    device : {"auto", "cpu", "cuda"}
        Where to compute; "auto" takes CUDA when available.
    tol : float
        Relative tolerance: a vertex within ``tol * slice.diameter`` of a neuron's zero
        line is taken to lie on it. Regions narrower than that are not resolved.
    threshold : float
        For single-output networks, the decision boundary is where the output crosses it.
    levels : sequence of float, optional
        Level sets of output ``output`` to trace instead of a decision boundary
        (regression networks, implicit representations).
    chunk_elements : int
        Float64 elements per working chunk; lower it to use less memory.
    progress : callable, optional
        Called with the number of regions finished, chunk by chunk.

    Examples
    --------
    >>> import torch
    >>> from geomstore import Slice, partition
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> p = partition(net, Slice.box((-1, -1), (1, 1)), device="cpu")
    >>> abs(sum(p.regions.column("area").to_pylist()) - 4.0) < 1e-9
    True
    """
    if not isinstance(slice, Slice):
        raise GeomstoreError(f"slice must be a geomstore.Slice, got {type(slice).__name__}.")
    if not (0 < tol < 1e-3):
        raise GeomstoreError(f"tol must lie in (0, 1e-3); got {tol!r}.")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    program = Program(model, slice.input_shape, dev)
    k = program.n_outputs
    if levels is not None:
        if not 0 <= output < k:
            raise ModelShapeError(f"output {output} does not exist; the model has {k} outputs.")
        lv: list[float] | None = [float(x) for x in levels]
    elif k == 1:
        lv = [float(threshold)]
    else:
        lv = None
    descent = Descent(program, slice, tol=tol, chunk_elements=chunk_elements, progress=progress)
    raw = descent.run().concat()
    centre = descent.centre
    verts_c, n = raw["verts"], raw["n"]
    vals = raw["values"]  # (P, 3, K) output slopes along u0, u1 and value at the centre
    amap = np.stack([vals[:, 0], vals[:, 1]], axis=2)
    c_centre = vals[:, 2]
    cvec = c_centre - amap @ centre
    verts = np.where(
        (np.arange(verts_c.shape[1])[None, :] < n[:, None])[..., None], verts_c + centre, 0.0
    )
    area, cen_c = polygon_measures(verts_c, n)
    cen = cen_c + centre
    fcen = np.einsum("pkd,pd->pk", amap, cen_c) + c_centre
    label = fcen.argmax(1) if k > 1 else (fcen[:, 0] > threshold).astype(np.int64)
    specs = program.nonlinearities
    patterns = _pack_patterns(raw["states"], [(s.unit_offset, s.n_units, s.bits) for s in specs])
    regions = table_regions(verts, n, area, cen, patterns, amap, cvec, label)

    scale_tol = tol * slice.diameter
    cut_units = (
        torch.cat(descent.cuts.units).cpu().numpy() if descent.cuts.count else np.zeros(0, int)
    )
    cut_dirs = (
        torch.cat(descent.cuts.dirs).cpu().numpy() if descent.cuts.count else np.zeros((0, 2))
    )
    ov = edge_overlay(verts_c, n, raw["side"], cut_units, cut_dirs, scale_tol)
    offsets = np.array([s.unit_offset for s in specs] + [program.n_units])
    unit = ov["unit"]
    layer = np.where(unit >= 0, np.searchsorted(offsets, unit, side="right") - 1, -1)
    neuron = np.where(unit >= 0, unit - offsets[np.maximum(layer, 0)], -1)
    edges = table_segments(
        ov["a"] + centre,
        ov["b"] + centre,
        {
            "region_left": ov["left"].astype(np.int64),
            "region_right": ov["right"].astype(np.int64),
            "layer": layer.astype(np.int64),
            "neuron": neuron.astype(np.int64),
            "unit": unit.astype(np.int64),
            "border_side": ov["border"].astype(np.int64),
        },
    )
    edges = edges.add_column(0, "edge_id", pa.array(np.arange(edges.num_rows, dtype=np.int64)))

    bd = boundary_segments(verts_c, n, amap, c_centre, levels=lv, output=output, tol=scale_tol)
    reg, ca, cb = bd["region"].astype(np.int64), bd["ca"].astype(np.int64), bd["cb"]
    if levels is None and k > 1:
        grad = amap[reg, cb.astype(np.int64)] - amap[reg, ca]  # towards class_b
    else:
        grad = amap[reg, ca]  # towards larger output
    seg = bd["b"] - bd["a"]
    normal = np.stack([-seg[:, 1], seg[:, 0]], 1) if len(seg) else np.zeros((0, 2))
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-300)
    normal = np.where(((normal * grad).sum(1) < 0)[:, None], -normal, normal)
    boundary = table_segments(
        bd["a"] + centre,
        bd["b"] + centre,
        {
            "region_id": bd["region"].astype(np.int64),
            "class_a": bd["ca"].astype(np.int64),
            "class_b": bd["cb"].astype(np.int64),
            "level": bd["lv"].astype(np.float64),
            "normal_u0": normal[:, 0].astype(np.float64),
            "normal_u1": normal[:, 1].astype(np.float64),
        },
    )
    seconds = time.perf_counter() - t0
    summary = {
        "n_outputs": k,
        "input_shape": list(slice.input_shape),
        "layers": [
            {
                "layer": s.layer,
                "name": s.name,
                "kind": s.kind,
                "units": s.n_units,
                "unit_offset": s.unit_offset,
                "bits": s.bits,
            }
            for s in specs
        ],
        "n_units": program.n_units,
        "weights_sha256": program.weights_sha256(),
    }
    settings = {
        "engine_version": ENGINE_VERSION,
        "tol": tol,
        "threshold": threshold,
        "levels": lv if levels is not None else None,
        "output": output,
        "device": str(dev),
        "boundary_kind": "levels" if levels is not None else ("threshold" if k == 1 else "top2"),
    }
    return Partition(
        regions=regions,
        edges=edges,
        boundary=boundary,
        slice=slice,
        model_summary=summary,
        settings=settings,
        seconds=seconds,
        states=raw["states"],
        program=program,
    )
