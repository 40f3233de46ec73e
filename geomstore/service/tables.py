"""Rows of one partition's tables, and the affine maps of the regions holding points:
the SQL the service sends through the sandbox (``Store.sql``) beside the query functions."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from geomstore.errors import GeomstoreError, NotFoundError
from geomstore.store.store import Store

__all__ = [
    "Table",
    "parse_bbox",
    "partition_rows",
    "pattern_hashes",
    "require_partition",
    "with_affine",
]

Table = Literal["regions", "edges", "boundary"]

_COLUMNS: dict[tuple[str, str], list[str]] = {}
_COLUMNS_LOCK = threading.Lock()


def _columns_of(store: Store, table: str) -> list[str]:
    """A data table's columns (but partition_id), per store."""
    key = (store.target, table)
    with _COLUMNS_LOCK:
        if key not in _COLUMNS:
            names = store.sql(f"SELECT * FROM {table} LIMIT 0").table.column_names
            _COLUMNS[key] = [c for c in names if c != "partition_id"]
        return _COLUMNS[key]


def require_partition(store: Store, partition_id: str) -> None:
    found = store.sql(
        "SELECT count(*) AS n FROM partitions WHERE partition_id = ?", [partition_id]
    ).table
    if found.column("n")[0].as_py() == 0:
        raise NotFoundError(
            f"no partition {partition_id!r} in this store; list them with GET /api/partitions.",
            kind="partition",
            name=partition_id,
        )


def parse_bbox(bbox: str | None) -> list[float] | None:
    if bbox is None:
        return None
    try:
        vals = [float(v) for v in bbox.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(np.isfinite(vals)) or vals[0] > vals[2] or vals[1] > vals[3]:
        raise GeomstoreError(
            f"bbox {bbox!r}: give four finite numbers u0_min,u1_min,u0_max,u1_max "
            "(min before max), e.g. bbox=-1,-1,1,1"
        )
    return vals


def pattern_hashes(patterns: Sequence[bytes | None]) -> pa.Array:
    """A short hash of each packed activation pattern (the first 16 bytes of its SHA-256),
    for stores written before regions carried the engine's ``pattern_hash``.

    Examples
    --------
    >>> pattern_hashes([b"\\x01", None]).to_pylist()[0].hex()
    '4bf5122f344554c53bde2ebb8cd2b7e3'
    """
    return pa.array(
        [None if p is None else hashlib.sha256(p).digest()[:16] for p in patterns], pa.binary()
    )


def partition_rows(
    store: Store,
    partition_id: str,
    table: Table,
    *,
    columns: Sequence[str] | None,
    bbox: Sequence[float] | None,
    max_rows: int,
) -> tuple[pa.Table, bool]:
    """Rows of one partition's table (geometry as WKB), optionally within a bbox."""
    known = _columns_of(store, table)
    derived = table == "regions" and "pattern_hash" not in known  # an older store
    wanted = list(columns) if columns else list(known) + (["pattern_hash"] if derived else [])
    bad = [c for c in wanted if c not in known and not (derived and c == "pattern_hash")]
    if bad:
        extra = ", pattern_hash" if derived else ""
        raise GeomstoreError(
            f"unknown column {bad[0]!r} of {table}; columns: {', '.join(known)}{extra}."
        )
    select = [c for c in wanted if c != "pattern_hash"]
    if "pattern_hash" in wanted and "pattern" not in select:
        select.append("pattern")
    exprs = ["ST_AsWKB(geometry)::BLOB AS geometry" if c == "geometry" else c for c in select]
    order = known[0] if table != "boundary" else "region_id, u0_a, u1_a"
    sql = f"SELECT {', '.join(exprs) or 'NULL AS none'} FROM {table} WHERE partition_id = ?"
    params: list[Any] = [partition_id]
    if bbox is not None:
        sql += " AND ST_Intersects(geometry, ST_MakeEnvelope(?, ?, ?, ?))"
        params += list(bbox)
    require_partition(store, partition_id)
    res = store.sql(sql + f" ORDER BY {order}", params, max_rows=max_rows)
    out = res.table
    if "pattern_hash" in wanted:
        out = out.append_column("pattern_hash", pattern_hashes(out.column("pattern").to_pylist()))
    return out.select(wanted), res.truncated


def with_affine(table: pa.Table) -> pa.Table:
    """``point_regions(..., affine=True)``'s table with the partition id first, as the
    service answers it (the holding region's affine map A, c and pattern hash are read in
    the same scan as the region)."""
    pid = table.column("partition_id")
    return table.drop_columns(["partition_id"]).add_column(0, "partition_id", pid)
