"""``partition(net, slice)``: the exact tiling of a slice by a network, as Arrow tables."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import numpy as np
import pyarrow as pa
import shapely
import torch
from torch import Tensor

from geomstore._aliases import renamed_kwargs
from geomstore.engine.boundary_edges import with_edge_boundary
from geomstore.engine.budget import default_memory, parse_memory, resolve_device
from geomstore.engine.descent import Descent, Progress
from geomstore.engine.graph import Program
from geomstore.engine.host import to_host
from geomstore.engine.merge import merge_equal_patterns
from geomstore.engine.patterns import (
    PATTERN_LIMIT_BITS,
    PatternHash,
    hash_bytes,
    packed_binary,
    unpack_patterns,
)
from geomstore.engine.tables import (
    boundary_segments,
    edge_overlay,
    polygon_measures,
    table_regions,
    table_segments,
)
from geomstore.engine.wkb import polygons_wkb
from geomstore.errors import GeomstoreError, ModelShapeError
from geomstore.slice import Slice

__all__ = [
    "ENGINE_VERSION",
    "Partition",
    "Progress",
    "default_memory",
    "parse_memory",
    "partition",
    "resolve_device",
]

ENGINE_VERSION = "1"
DEFAULT_TOL = 1e-10


class _PackedStates(NamedTuple):
    """Whole patterns as the descent left them: packed rows and their bit layout."""

    packed: list[np.ndarray]  # (rows, bytes) uint8 per chunk of the descent
    layout: list[tuple[int, int, int]]  # (unit_offset, n_units, bits) per nonlinearity
    n_units: int

    def unpack(self) -> np.ndarray:
        return np.concatenate([unpack_patterns(p, self.layout, self.n_units) for p in self.packed])


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
    states: np.ndarray | None = field(repr=False)
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

    def pattern_hashes(self) -> np.ndarray:
        """Every region's 128-bit pattern hash as (P, 2) int64 lanes."""
        col = self.regions.column("pattern_hash").combine_chunks()
        raw = np.frombuffer(col.buffers()[1], dtype="<i8", count=2 * col.offset + 2 * len(col))
        return raw[2 * col.offset :].reshape(-1, 2).astype(np.int64)

    @renamed_kwargs(model="net")
    def patterns(self, region_ids: Any = None, *, net: Any = None) -> np.ndarray:
        """Whole activation patterns (n, units) of ``region_ids`` (all when None).

        Stored whole for small models; for large ones (see ``partition(memory=)``)
        recomputed by running the network at an interior point of each region and checked
        against the region's stored pattern hash. ``net`` (the checkpoint's network) is
        needed when the partition has no program attached (one loaded from a store).

        Examples
        --------
        >>> import torch
        >>> from geomstore import Slice, partition
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU())
        >>> p = partition(net, Slice.box((-1, -1), (1, 1)), device="cpu")
        >>> p.patterns([0]).shape
        (1, 4)
        """
        ids = (
            np.arange(self.n_regions)
            if region_ids is None
            else np.asarray(region_ids, dtype=np.int64).reshape(-1)
        )
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_regions):
            raise GeomstoreError(
                f"region ids must lie in 0..{self.n_regions - 1}; got {ids.min()}..{ids.max()}."
            )
        if self.states is not None:
            return self.states[ids]
        if self.program is None and net is None:
            raise GeomstoreError(
                "this partition keeps pattern hashes only; pass net= (the checkpoint's "
                "network) to recompute its patterns."
            )
        return interior_patterns(self, self.program_for(net), ids)

    def program_for(self, net: Any = None) -> Program:
        """The lowered network of this partition: the one attached, or ``net`` lowered on
        the CPU after checking that its weights are the ones this partition was computed
        with (a partition loaded from a store has none attached)."""
        if self.program is not None:
            return self.program
        if net is None:
            raise GeomstoreError(
                "this partition has no network attached (it was loaded from a store); pass "
                "net= (the checkpoint's network)."
            )
        program = Program(
            net,
            self.slice.input_shape,
            torch.device("cpu"),
            logits=self.settings.get("logits", False),
        )
        if program.weights_sha256() != self.model_summary.get("weights_sha256"):
            raise GeomstoreError(
                "the model given is not the one this partition was computed with "
                "(its weights differ); pass that checkpoint's network."
            )
        return program

    def polygons(self) -> np.ndarray:
        """Regions as shapely polygons."""
        import shapely

        return shapely.from_wkb(self.regions.column("geometry").to_numpy(zero_copy_only=False))

    @renamed_kwargs(model="net")
    def verify(
        self, net: Any = None, *, grid: int = 96, brute_force: bool = True, points: int = 2
    ) -> Any:
        """Run the exactness checks of design.md section 3; see :func:`geomstore.verify`."""
        from geomstore.engine.verify import verify

        return verify(self, net, grid=grid, brute_force=brute_force, points=points)

    def __repr__(self) -> str:
        return (
            f"Partition(regions={self.n_regions}, edges={self.edges.num_rows}, "
            f"boundary={self.boundary.num_rows}, "
            f"slice={self.slice.name or self.slice.content_hash[:8]}, seconds={self.seconds:.3f})"
        )


def _get_states(self: Partition) -> np.ndarray | None:
    states = self.__dict__.get("_states")
    if isinstance(states, _PackedStates):  # unpacked once, when first read
        states = self.__dict__["_states"] = states.unpack()
    return states


def _set_states(self: Partition, states: np.ndarray | _PackedStates | None) -> None:
    self.__dict__["_states"] = states


# ``states`` (P, units) uint8, or None for partitions that keep pattern hashes only: a
# property, so that a fresh partition unpacks its patterns only when they are read
Partition.states = property(_get_states, _set_states)  # type: ignore[assignment]


def interior_patterns(part: Partition, program: Program, ids: np.ndarray) -> np.ndarray:
    """Recompute regions' patterns at interior points, each checked against its hash."""
    from geomstore.engine.verify import model_states

    polys = part.polygons()[ids]
    hasher = PatternHash(program.n_units)
    want = part.pattern_hashes()[ids]
    out = np.zeros((len(ids), program.n_units), dtype=np.uint8)
    todo = np.arange(len(ids))
    rng = np.random.default_rng(0)
    for attempt in range(4):  # the centroid, then random interior points for thin regions
        if attempt == 0:
            u = np.stack(
                [
                    shapely.get_x(shapely.centroid(polys[todo])),
                    shapely.get_y(shapely.centroid(polys[todo])),
                ],
                1,
            )
        else:
            u = _interior_points(polys[todo], rng, 1)[0]
        x = torch.as_tensor(part.slice.lift(u, shaped=True), device=program.device)
        _, states, _ = model_states(program, x)
        got = hasher.of(torch.from_numpy(states)).numpy()
        ok = (got == want[todo]).all(1)
        out[todo[ok]] = states[ok]
        todo = todo[~ok]
        if not todo.size:
            return out
    raise GeomstoreError(
        f"{todo.size} region(s) have no interior point whose pattern matches the stored hash "
        f"(first: region {int(ids[todo[0]])}); was the partition computed with this model?"
    )


def _interior_points(polys: np.ndarray, rng: np.random.Generator, k: int) -> list[np.ndarray]:
    """``k`` random interior points per convex polygon (positive vertex weights)."""
    coords, idx = shapely.get_coordinates(polys, return_index=True)
    # drop each ring's closing vertex
    last = np.r_[idx[1:] != idx[:-1], True]
    coords, idx = coords[~last], idx[~last]
    pts = []
    for _ in range(k):
        w = rng.exponential(size=len(idx)) + 1e-3
        tot = np.bincount(idx, weights=w, minlength=len(polys))
        px = np.bincount(idx, weights=w * coords[:, 0], minlength=len(polys)) / tot
        py = np.bincount(idx, weights=w * coords[:, 1], minlength=len(polys)) / tot
        pts.append(np.stack([px, py], 1))
    return pts


def _region_table(
    raw: dict[str, Any], centre: np.ndarray, threshold: float, packed: list[np.ndarray] | None
) -> tuple[pa.Table, Tensor, Tensor, Tensor, Tensor, np.ndarray]:
    """The regions table, computed on the descent's device; also what the decision
    boundary reads there: centred vertices, counts, slopes (P, K, 2), centre values,
    and the slopes on the host."""
    verts_c, n, vals = raw["verts"], raw["n"], raw["values"]
    ctr = torch.as_tensor(centre, dtype=torch.float64, device=verts_c.device)
    amap = torch.stack([vals[:, 0], vals[:, 1]], dim=2)  # (P, K, 2)
    c_centre = vals[:, 2]  # (P, K): value at the slice centre
    cvec = c_centre - amap @ ctr
    valid = torch.arange(verts_c.shape[1], device=verts_c.device)[None, :] < n[:, None]
    verts = torch.where(valid[..., None], verts_c + ctr, 0.0)
    area, cen_c = polygon_measures(verts_c, n)
    fcen = torch.bmm(amap, cen_c.unsqueeze(2)).squeeze(2) + c_centre
    k = int(amap.shape[1])
    label = fcen.argmax(1) if k > 1 else (fcen[:, 0] > threshold).to(torch.int64)
    slope_norm = torch.sqrt((amap * amap).sum(dim=(1, 2)))
    host = {
        key: to_host(t)
        for key, t in {
            "area": area,
            "cen": cen_c + ctr,
            "n": n,
            "amap": amap,
            "cvec": cvec,
            "label": label,
            "slope_norm": slope_norm,
            "hashes": raw["hashes"],
        }.items()
    }
    # large models keep the pattern hash only
    patterns = pa.nulls(len(host["n"]), pa.binary()) if packed is None else packed_binary(packed)
    regions = table_regions(
        polygons_wkb(verts, n),
        host["area"],
        host["cen"],
        host["n"],
        patterns,
        host["amap"],
        host["cvec"],
        host["label"],
        host["slope_norm"],
    )
    at = regions.schema.get_field_index("pattern") + 1
    regions = regions.add_column(at, "pattern_hash", hash_bytes(host["hashes"]))
    return regions, verts_c, n, amap, c_centre, host["amap"]


def _tables(
    raw: dict[str, Any],
    descent: Descent,
    threshold: float,
    lv: list[float] | None,
    output: int,
    scale_tol: float,
    top2: bool,
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The regions, edges and boundary tables, built where ``raw``'s tensors are; ``top2``:
    the boundary is where the top two outputs tie (else the level sets ``lv``)."""
    dev = raw["verts"].device
    program = descent.program
    specs = program.nonlinearities
    packed = raw["packed"]  # host arrays, one per chunk (None: hashes only)
    regions, verts_c, n, amap_t, c_centre, amap = _region_table(
        raw, descent.centre, threshold, packed
    )
    centre = descent.centre
    cuts = descent.cuts
    cut_units = torch.cat(cuts.units) if cuts.count else torch.zeros(0, dtype=torch.long)
    cut_dirs = torch.cat(cuts.dirs) if cuts.count else torch.zeros((0, 2), dtype=torch.float64)
    ov = edge_overlay(
        raw["verts"], raw["n"], raw["side"], cut_units.to(dev), cut_dirs.to(dev), scale_tol
    )
    offsets = torch.tensor([s.unit_offset for s in specs] + [program.n_units], device=dev)
    unit = ov["unit"]
    # the domain's sides (unit -1) get layer -1 and a negative neuron: both null
    layer = torch.searchsorted(offsets, unit, right=True) - 1
    neuron = unit - offsets[layer]
    ctr = torch.as_tensor(centre, dtype=torch.float64, device=dev)
    edges = table_segments(
        ov["a"] + ctr,
        ov["b"] + ctr,
        {
            "region_left": ov["left"],
            "region_right": ov["right"],
            "layer": layer,
            "neuron": neuron,
            "unit": unit,
            "border_side": ov["border"],
        },
    )
    edges = edges.add_column(0, "edge_id", pa.array(np.arange(edges.num_rows, dtype=np.int64)))

    bd = boundary_segments(verts_c, n, amap_t, c_centre, levels=lv, output=output, tol=scale_tol)
    bd = with_edge_boundary(bd, ov, regions, centre, amap_t, c_centre, lv, output, scale_tol)
    reg, ca, cb = bd["region"].astype(np.int64), bd["ca"].astype(np.int64), bd["cb"]
    # towards class_b (top two), towards larger output (levels)
    grad = amap[reg, cb.astype(np.int64)] - amap[reg, ca] if top2 else amap[reg, ca]
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
    return regions, edges, boundary


@renamed_kwargs(model="net")
def partition(
    net: Any,
    slice: Slice,
    *,
    device: str | torch.device = "auto",
    tol: float = DEFAULT_TOL,
    threshold: float = 0.0,
    levels: Sequence[float] | None = None,
    output: int = 0,
    memory: int | str | None = None,
    chunk_elements: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    logits: bool = False,
) -> Partition:
    """Compute every linear region of ``net`` on ``slice``, exactly, in float64.

    Parameters
    ----------
    net : torch.nn.Module or torch.export.ExportedProgram
        A network of affine layers and piecewise-linear activations, in eval mode
        (``model=`` is the deprecated spelling).
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
    memory : int or str, optional
        Memory budget of the computation, in bytes or as ``"4GiB"``; by default half the
        GPU's memory on CUDA (see :func:`default_memory`), else min(4 GiB, RAM / 4). Work
        is chunked by what one cell really carries (the affine forms of the widest live
        tensors, skip connections included); a model whose single cell does not fit raises
        :class:`geomstore.errors.MemoryBudgetError`. Activation patterns longer than
        :data:`geomstore.engine.patterns.PATTERN_LIMIT_BITS` bits are kept as a 128-bit
        hash per region (``pattern_hash``); :meth:`Partition.patterns` recomputes them.
    chunk_elements : int, optional
        Float64 elements per working chunk, overriding the one derived from ``memory``.
        The budget (or this) sizes the chunks, which decide the order of the regions and
        the last bits of their affine maps: for bit-for-bit equal results, keep the device
        and these two the same (``settings`` records both).
    progress : callable, optional
        Called with a :class:`Progress` (regions finished, cells pending at each depth,
        seconds elapsed) each time a chunk of regions is finished.
    logits : bool
        Accept a model that ends in softmax / log-softmax by removing that last operation:
        the regions, affine maps and decision boundary are then those of the logits
        (softmax is monotone, so the predicted class is the same). Without it such a
        model is refused.

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
    program = Program(net, slice.input_shape, dev, logits=logits)
    k = program.n_outputs
    if levels is not None:
        if not 0 <= output < k:
            raise ModelShapeError(f"output {output} does not exist; the model has {k} outputs.")
        lv: list[float] | None = [float(x) for x in levels]
    elif k == 1:
        lv = [float(threshold)]
    else:
        lv = None
    if lv is not None and not all(math.isfinite(x) for x in lv):
        what = "levels" if levels is not None else "threshold"
        raise GeomstoreError(f"{what} must be finite numbers; got {lv!r}.")
    budget = parse_memory(memory) if memory is not None else default_memory(dev)
    whole = isinstance(chunk_elements, int) and not isinstance(chunk_elements, bool)
    if chunk_elements is not None and not (whole and chunk_elements >= 1):
        raise GeomstoreError(
            f"chunk_elements must be a positive whole number of float64 elements; got "
            f"{chunk_elements!r} (leave it out to size the chunks from memory=)."
        )
    specs = program.nonlinearities
    n_bits = sum(s.n_units * s.bits for s in specs)
    big = n_bits > PATTERN_LIMIT_BITS
    descent = Descent(
        program,
        slice,
        tol=tol,
        memory=budget,
        chunk_elements=chunk_elements,
        progress=progress,
        hash_patterns=big,
    )
    raw = descent.run().concat()  # tensors on the compute device
    if any(s.kind == "maxpool" for s in specs):  # a max unit's tournament can cut a cell
        raw = merge_equal_patterns(raw, tol * slice.diameter)
    top2 = levels is None and k > 1
    args = (raw, descent, threshold, lv, output, tol * slice.diameter, top2)
    try:
        regions, edges, boundary = _tables(*args)
    except torch.OutOfMemoryError:
        # the tables of a partition this large do not fit beside what the device holds:
        # build them on the CPU (the same tensor code)
        if dev.type == "cpu":
            raise
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        raw = {key: v.cpu() if isinstance(v, Tensor) else v for key, v in raw.items()}
        regions, edges, boundary = _tables(raw, *args[1:])
    seconds = time.perf_counter() - t0
    packed = raw["packed"]  # host arrays, one per chunk (None: hashes only)
    layout = descent.out.layout  # (unit_offset, n_units, bits) of each nonlinearity
    n_units = program.n_units  # states are unpacked when first read (see ``_get_states``)
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
        "patterns": "hash" if big else "whole",
        "weights_sha256": program.weights_sha256(),
    }
    settings = {
        "engine_version": ENGINE_VERSION,
        "tol": tol,
        "threshold": threshold,
        "levels": lv if levels is not None else None,
        "output": output,
        "device": str(dev),
        "memory": budget,
        "chunk_elements": chunk_elements,
        "logits": logits,
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
        states=None if packed is None else cast(Any, _PackedStates(packed, layout, n_units)),
        program=program,
    )
