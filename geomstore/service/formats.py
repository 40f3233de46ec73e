"""Result tables as HTTP bodies: JSON (default), Arrow IPC, Parquet, CSV and GeoJSON.

The format comes from ``?format=`` or else the ``Accept`` header. JSON is an object::

    {"columns": ["a", ...], "rows": [{"a": 1, ...}, ...], "num_rows": n, "truncated": false}

with binary cells as hex strings, WKB ``geometry`` cells as WKT, and tensors and lists as
nested lists. Arrow IPC is one stream (``application/vnd.apache.arrow.stream``) whose
schema metadata ``geomstore.truncated`` says whether rows were left out; every format
also sets the ``X-Geomstore-Truncated`` header. GeoJSON is a FeatureCollection in slice
coordinates with the table's WKB ``geometry`` column as each feature's geometry.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterator
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
from shapely.errors import GEOSException

from geomstore.errors import GeomstoreError, QueryTimeoutError

__all__ = [
    "ARROW",
    "FORMATS",
    "Format",
    "FormatError",
    "choose_format",
    "encode_table",
    "json_ready",
]

Format = Literal["json", "arrow", "parquet", "csv", "geojson"]
FORMATS: tuple[str, ...] = get_args(Format)
ARROW = "application/vnd.apache.arrow.stream"
MEDIA: dict[str, str] = {
    "json": "application/json",
    "arrow": ARROW,
    "parquet": "application/vnd.apache.parquet",
    "csv": "text/csv; charset=utf-8",
    "geojson": "application/geo+json",
}
_BY_MEDIA = {
    "application/json": "json",
    ARROW: "arrow",
    "application/vnd.apache.arrow.file": "arrow",
    "application/x-apache-arrow-stream": "arrow",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
    "text/csv": "csv",
    "application/geo+json": "geojson",
}


class FormatError(GeomstoreError, ValueError):
    """An unknown output format, or one the result cannot be written in."""


def choose_format(query_format: str | None, accept: str | None) -> Format:
    """The output format: ``?format=`` wins, then the known type in ``Accept`` with the
    highest quality value (the first of equals; ``q=0`` refuses a type), else JSON.

    Examples
    --------
    >>> choose_format(None, "application/vnd.apache.arrow.stream")
    'arrow'
    >>> choose_format("csv", "application/json")
    'csv'
    >>> choose_format(None, "text/html,*/*")
    'json'
    >>> choose_format(None, "application/vnd.apache.arrow.stream;q=0.1, text/csv;q=0.9")
    'csv'
    """
    if query_format:
        fmt = query_format.strip().lower()
        if fmt not in FORMATS:
            raise FormatError(f"format must be one of {', '.join(FORMATS)}; got {query_format!r}.")
        return fmt  # type: ignore[return-value]
    best: tuple[float, str] | None = None
    for part in (accept or "").split(","):
        media, *params = (p.strip().lower() for p in part.split(";"))
        if media not in _BY_MEDIA:
            continue
        q = _quality(params)
        if q > 0 and (best is None or q > best[0]):
            best = (q, _BY_MEDIA[media])
    return best[1] if best else "json"  # type: ignore[return-value]


def _quality(params: list[str]) -> float:
    """The ``q=`` of a media range's parameters (1 when absent, 0 when unreadable)."""
    for p in params:
        key, _, value = p.partition("=")
        if key.strip() == "q":
            try:
                q = float(value)
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def _wkt(values: list[Any]) -> list[str | None]:
    import shapely

    arr = np.asarray(values, dtype=object)
    geoms = shapely.from_wkb(arr)
    return [None if g is None else g.wkt for g in geoms]


def json_ready(value: Any) -> Any:
    """A cell as JSON: bytes as hex, non-finite floats as null, other objects as text."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    return str(value)


def _plain_columns(table: pa.Table) -> dict[str, list[Any]]:
    """Each column as Python values; WKB geometry as WKT, tensors as nested lists."""
    cols: dict[str, list[Any]] = {}
    for name, col in zip(table.column_names, table.columns):
        if isinstance(col.type, pa.FixedShapeTensorType):
            arr = col.combine_chunks()
            cols[name] = arr.to_numpy_ndarray().tolist() if len(arr) else []
        elif name == "geometry" and pa.types.is_binary(col.type):
            cols[name] = _wkt(col.to_pylist())
        else:
            cols[name] = col.to_pylist()
    return cols


#: Bytes of Arrow data turned into Python values at a time (between two looks at the clock).
BATCH_BYTES = 1 << 20


def _batches(table: pa.Table, deadline: float | None) -> Iterator[pa.Table]:
    """``table`` in slices of about :data:`BATCH_BYTES`; past ``deadline`` (a
    ``time.monotonic()``), raises :class:`QueryTimeoutError`: writing JSON, CSV or
    GeoJSON is Python work per cell, and an answer must not take longer than a query."""
    n = table.num_rows
    step = max(1, min(n, int(n * BATCH_BYTES / max(1, table.nbytes)))) if n else 1
    for lo in range(0, n, step):
        if deadline is not None and time.monotonic() > deadline:
            raise QueryTimeoutError(
                f"writing the answer ({n} rows) took longer than this server's timeout; ask "
                "for format arrow or parquet (written without a row-by-row pass), or for "
                "fewer rows or columns.",
                timeout=0.0,
            )
        yield table.slice(lo, step)


def _rows(table: pa.Table, deadline: float | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for batch in _batches(table, deadline):
        cols = _plain_columns(batch)
        names = list(cols)
        out += [{k: json_ready(cols[k][i]) for k in names} for i in range(batch.num_rows)]
    return out


def _json(
    table: pa.Table, truncated: bool, extra: dict[str, Any] | None, deadline: float | None = None
) -> bytes:
    body: dict[str, Any] = {
        "columns": table.column_names,
        "rows": _rows(table, deadline),
        "num_rows": table.num_rows,
        "truncated": truncated,
    }
    body.update(extra or {})
    return json.dumps(body, allow_nan=False).encode()


def _arrow(table: pa.Table, truncated: bool, extra: dict[str, Any] | None) -> bytes:
    meta = dict(table.schema.metadata or {})
    meta[b"geomstore.truncated"] = b"true" if truncated else b"false"
    for key, value in (extra or {}).items():
        meta[f"geomstore.{key}".encode()] = json.dumps(json_ready(value)).encode()
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def _parquet(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue())


#: What encoding a value the format cannot hold raises (pyarrow's type errors, Python's
#: range errors such as an infinite date).
_UNWRITABLE = (pa.ArrowException, TypeError, ValueError, OverflowError, GEOSException)


def _unwritable(table: pa.Table, fmt: Format) -> str:
    """The first column ``fmt`` cannot hold, named with its type, and what to do instead."""
    other = " or ".join(f for f in ("arrow", "json") if f != fmt)
    keep = [table.column_names.index("geometry")] if fmt == "geojson" else []
    for i, field in enumerate(table.schema):
        try:
            _encode(table.select(sorted({i, *keep})), fmt, False, None)
        except _UNWRITABLE:
            return (
                f"column {field.name!r} of type {field.type}; cast it in the query "
                f'(CAST("{field.name}" AS VARCHAR)) or ask for format {other}.'
            )
    return f"this result; ask for format {other}."


def _csv(table: pa.Table, deadline: float | None = None) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(table.column_names)
    for row in _rows(table, deadline):
        writer.writerow(
            json.dumps(v) if isinstance(v, list | dict) else ("" if v is None else v)
            for v in row.values()
        )
    return buf.getvalue().encode()


def _geojson(table: pa.Table, deadline: float | None = None) -> bytes:
    import shapely

    if table.column_names.count("geometry") != 1 or not pa.types.is_binary(
        table.schema.field("geometry").type
    ):
        raise FormatError(
            "format geojson needs one WKB geometry column named 'geometry' in the result; "
            "ask for regions, edges or boundary (with the geometry column), or use json."
        )
    features = []
    for batch in _batches(table, deadline):
        geoms = shapely.from_wkb(np.asarray(batch.column("geometry").to_pylist(), dtype=object))
        props = _plain_columns(batch.drop_columns(["geometry"]))
        features += [
            {
                "type": "Feature",
                "geometry": None if g is None else json.loads(shapely.to_geojson(g)),
                "properties": {k: json_ready(v[i]) for k, v in props.items()},
            }
            for i, g in enumerate(geoms)
        ]
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


def encode_table(
    table: pa.Table,
    fmt: Format,
    *,
    truncated: bool = False,
    extra: dict[str, Any] | None = None,
    deadline: float | None = None,
) -> tuple[bytes, str]:
    """The body and media type of ``table`` in ``fmt``.

    ``extra`` adds top-level keys to JSON and ``geomstore.<key>`` schema metadata to Arrow.
    Past ``deadline`` (a ``time.monotonic()``), writing JSON, CSV or GeoJSON stops with
    :class:`~geomstore.errors.QueryTimeoutError`.

    Examples
    --------
    >>> body, media = encode_table(pa.table({"a": [1, 2]}), "json")
    >>> media, json.loads(body)["rows"]
    ('application/json', [{'a': 1}, {'a': 2}])
    """
    try:
        return _encode(table, fmt, truncated, extra, deadline)
    except _UNWRITABLE as exc:
        if isinstance(exc, GeomstoreError):
            raise
        raise FormatError(f"format {fmt} cannot hold {_unwritable(table, fmt)}") from exc


def _encode(
    table: pa.Table,
    fmt: Format,
    truncated: bool,
    extra: dict[str, Any] | None,
    deadline: float | None = None,
) -> tuple[bytes, str]:
    if fmt == "json":
        return _json(table, truncated, extra, deadline), MEDIA["json"]
    if fmt == "arrow":
        return _arrow(table, truncated, extra), MEDIA["arrow"]
    if fmt == "parquet":
        return _parquet(table), MEDIA["parquet"]
    if fmt == "csv":
        return _csv(table, deadline), MEDIA["csv"]
    if fmt == "geojson":
        return _geojson(table, deadline), MEDIA["geojson"]
    raise FormatError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}.")
