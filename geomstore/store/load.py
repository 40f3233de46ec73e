"""Reading a stored partition back as a :class:`~geomstore.Partition`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from geomstore.engine.partition import Partition
from geomstore.engine.patterns import PatternHash, hash_bytes, unpack_patterns
from geomstore.errors import NotFoundError, StoreError
from geomstore.slice import Slice

if TYPE_CHECKING:
    from geomstore.store.store import Store

__all__ = ["load_partition", "load_slice"]


def load_partition(store: Store, partition_id: str) -> Partition:
    """Rebuild a stored partition (tables, slice, model summary, settings).

    The result has no network attached: ``verify(net)`` and ``patterns(net=)`` take the
    checkpoint's network (checked against the checkpoint's weight hash); its ``states``
    are unpacked from the stored patterns.
    """
    con = store.reader()
    meta = con.execute(
        "SELECT p.settings, p.seconds, m.summary, c.sha256, s.name, s.input_shape, s.origin, "
        "s.basis, ST_AsText(s.domain) FROM partitions p "
        "JOIN checkpoints c ON c.checkpoint_id = p.checkpoint_id "
        "JOIN models m ON m.model_id = c.model_id JOIN slices s ON s.slice_id = p.slice_id "
        "WHERE p.partition_id = ?",
        [partition_id],
    ).fetchone()
    if meta is None:
        raise NotFoundError(
            f"no partition {partition_id!r} in this store; list them with "
            "store.partitions() or geomstore partitions STORE.",
            kind="partition",
            name=partition_id,
        )
    settings, seconds, summary_json, weights, name, shape, origin, basis, domain_wkt = meta
    summary = json.loads(summary_json)
    if weights:  # the model row keeps its first checkpoint's hash; this one's is here
        summary["weights_sha256"] = weights
    sl = _slice_from_row(name, shape, origin, basis, domain_wkt)
    k = summary["n_outputs"]

    def fetch(sql: str) -> pa.Table:
        return con.execute(sql, [partition_id]).to_arrow_table()

    regions = fetch(
        "SELECT region_id, ST_AsWKB(geometry)::BLOB AS geometry, area, centroid_u0, "
        "centroid_u1, n_vertices, pattern, pattern_hash, A, c, label, slope_norm FROM regions "
        "WHERE partition_id = ? ORDER BY region_id"
    )
    regions = regions.set_column(
        regions.schema.get_field_index("A"),
        "A",
        pa.FixedSizeListArray.from_arrays(regions.column("A").combine_chunks().flatten(), 2 * k),
    )
    regions = regions.set_column(
        regions.schema.get_field_index("c"),
        "c",
        pa.FixedSizeListArray.from_arrays(regions.column("c").combine_chunks().flatten(), k),
    )
    edges = fetch(
        "SELECT edge_id, ST_AsWKB(geometry)::BLOB AS geometry, u0_a, u1_a, u0_b, u1_b, "
        "length, region_left, region_right, layer, neuron, unit, border_side FROM edges "
        "WHERE partition_id = ? ORDER BY edge_id"
    )
    boundary = fetch(
        "SELECT ST_AsWKB(geometry)::BLOB AS geometry, u0_a, u1_a, u0_b, u1_b, length, "
        "region_id, class_a, class_b, level, normal_u0, normal_u1 FROM boundary "
        "WHERE partition_id = ? ORDER BY region_id, u0_a, u1_a"
    )
    states, regions = _states_and_hashes(regions, summary)
    return Partition(
        regions=regions,
        edges=edges,
        boundary=boundary,
        slice=sl,
        model_summary=summary,
        settings=json.loads(settings) | {"device": "stored"},
        seconds=seconds,
        states=states,
    )


def _states_and_hashes(regions: pa.Table, summary: dict[str, Any]) -> tuple[Any, pa.Table]:
    """Unpack whole patterns (None when only hashes were stored); fill missing hashes."""
    bits = [(lay["unit_offset"], lay["units"], lay["bits"]) for lay in summary["layers"]]
    col = regions.column("pattern")
    states = None
    if regions.num_rows and col.null_count == 0:
        packed = np.frombuffer(b"".join(col.to_pylist()), dtype=np.uint8)
        packed = packed.reshape(regions.num_rows, -1)
        states = unpack_patterns(packed, bits, summary["n_units"])
        # back to the type the engine wrote (the store keeps a BLOB)
        at = regions.schema.get_field_index("pattern")
        regions = regions.set_column(at, "pattern", col.cast(pa.binary(packed.shape[1])))
    elif not regions.num_rows:
        states = np.zeros((0, summary["n_units"]), dtype=np.uint8)
    at = regions.schema.get_field_index("pattern_hash")
    stored = regions.column("pattern_hash")
    if stored.null_count and states is not None:  # stored before hashes existed
        h = PatternHash(summary["n_units"]).of(torch.from_numpy(states)).numpy()
        fixed = hash_bytes(h)
    else:
        fixed = pa.array([bytes(v) for v in stored.to_pylist()], pa.binary(16))
    return states, regions.set_column(at, "pattern_hash", fixed)


def _slice_from_row(
    name: str | None, shape: str, origin: list[float], basis: list[float], domain_wkt: str
) -> Slice:
    ring = domain_wkt[domain_wkt.index("((") + 2 : domain_wkt.index("))")]
    dom = np.array([[float(v) for v in pt.split()] for pt in ring.split(",")])[:-1]
    dim = len(origin)
    return Slice(
        origin,
        np.asarray(basis).reshape(2, dim),
        dom,
        input_shape=json.loads(shape),
        name=name or "",
    )


def load_slice(store: Store, name: str) -> Slice:
    """A stored slice by name (or by slice id)."""
    rows = (
        store.reader()
        .execute(
            "SELECT slice_id, name, input_shape, origin, basis, ST_AsText(domain) FROM slices "
            "WHERE name = $n OR slice_id = $n ORDER BY created_at",
            {"n": name},
        )
        .fetchall()
    )
    if not rows:
        known = store.reader().execute("SELECT DISTINCT name FROM slices ORDER BY 1").fetchall()
        names = ", ".join(repr(r[0]) for r in known) or "none yet"
        raise NotFoundError(
            f"no slice named {name!r} in this store (stored slices: {names}).",
            kind="slice",
            name=name,
        )
    if len({r[0] for r in rows}) > 1:
        ids = ", ".join(r[0] for r in rows)
        raise StoreError(f"several slices are named {name!r} ({ids}); give the slice id instead.")
    return _slice_from_row(*rows[0][1:])
