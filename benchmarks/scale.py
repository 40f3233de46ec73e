"""Ingest at scale into a PostgreSQL catalog + S3 data path: prints JSON.

Usage: python benchmarks/scale.py [--n 1000] [--width 16]

Starts a throwaway PostgreSQL server and a moto S3 server on 127.0.0.1 (the test
fixtures), then writes ``--n`` partitions (one writer, one transaction each; seeded
2-W-W-3 MLPs on [-1, 1]^2, each stored as its own checkpoint) and reports: partitions per
second, data files (S3 objects) per partition before and after DuckLake compaction
(``ducklake_merge_adjacent_files`` + expiring the old snapshots and deleting their files),
catalog rows and Parquet bytes per partition, and the time of one query over all the
partitions before and after compaction. moto is a local, in-process S3: real S3 adds
network latency to every object, so treat partitions/s as an upper bound per writer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import geomstore
from tests.nets import BOX, mlp
from tests.pgserver import postgres_server
from tests.s3server import S3Server, s3_server

QUERY = (
    "SELECT count(*) AS regions, sum(ST_Area(geometry)) AS area, "
    "count(DISTINCT partition_id) AS partitions FROM regions"
)


def _objects(s3: S3Server, bucket: str) -> tuple[int, int]:
    c = s3.client()
    n = size = 0
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            n += 1
            size += int(o["Size"])
    return n, size


def _catalog_rows(store: geomstore.Store, dsn: str) -> int:
    """Rows in the PostgreSQL catalog's DuckLake tables (not the data in S3)."""
    con = store.con
    con.execute(f"ATTACH IF NOT EXISTS '{dsn}' AS pgmeta (TYPE postgres, READ_ONLY)")
    tables = con.execute(
        "SELECT schema_name, table_name FROM duckdb_tables() "
        "WHERE database_name = 'pgmeta' AND table_name LIKE 'ducklake%'"
    ).fetchall()
    total = 0
    for schema, t in tables:
        row = con.execute(f'SELECT count(*) FROM pgmeta."{schema}"."{t}"').fetchone()
        total += int(row[0]) if row else 0
    return total


def _query(store: geomstore.Store) -> tuple[float, list[dict[str, Any]]]:
    t = time.perf_counter()
    rows = store.sql(QUERY).table.to_pylist()
    return time.perf_counter() - t, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--distinct", type=int, default=20, help="distinct networks, cycled")
    args = ap.parse_args()
    parts = [
        geomstore.partition(mlp((args.width, args.width), 3, seed=i), BOX, device="cpu")
        for i in range(args.distinct)
    ]
    tmp = Path(tempfile.mkdtemp(prefix="geomstore-scale-"))
    with s3_server() as s3, postgres_server(tmp / "pg") as dsn:
        os.environ.update(s3.env())
        bucket = s3.bucket()
        target, data = f"postgres:{dsn}", f"s3://{bucket}/bench/"
        with geomstore.open(target, data_path=data) as store:
            t0 = time.perf_counter()
            for i in range(args.n):
                store.add(parts[i % len(parts)], model="bench", checkpoint=f"c{i:05d}", step=i)
            ingest = time.perf_counter() - t0
            files_before, bytes_before = _objects(s3, bucket)
            rows = _catalog_rows(store, dsn)
            q_before, result = _query(store)
            t1 = time.perf_counter()
            store.con.execute("CALL ducklake_merge_adjacent_files('gs')")
            store.con.execute("CALL ducklake_expire_snapshots('gs', older_than => now())")
            store.con.execute("CALL ducklake_cleanup_old_files('gs', cleanup_all => true)")
            compact = time.perf_counter() - t1
            files_after, bytes_after = _objects(s3, bucket)
            rows_after = _catalog_rows(store, dsn)
            store._ro = None  # a fresh read connection sees the compacted files
            q_after, result_after = _query(store)
    a, b = result[0], result_after[0]  # the same rows; the sum's order may differ
    assert (a["regions"], a["partitions"]) == (b["regions"], b["partitions"]), (a, b)
    assert abs(a["area"] - b["area"]) < 1e-9 * args.n, (a, b)
    n = args.n
    print(
        json.dumps(
            {
                "partitions": n,
                "network": f"2-{args.width}-{args.width}-3",
                "regions_per_partition": round(sum(p.n_regions for p in parts) / len(parts), 1),
                "ingest_seconds": round(ingest, 2),
                "partitions_per_second": round(n / ingest, 2),
                "files_per_partition_before": round(files_before / n, 3),
                "files_per_partition_after": round(files_after / n, 4),
                "parquet_bytes_per_partition_before": round(bytes_before / n),
                "parquet_bytes_per_partition_after": round(bytes_after / n),
                "catalog_rows_per_partition_before": round(rows / n, 2),
                "catalog_rows_per_partition_after": round(rows_after / n, 2),
                "compaction_seconds": round(compact, 2),
                "query_all_seconds_before": round(q_before, 3),
                "query_all_seconds_after": round(q_after, 3),
                "query_result": result[0],
            }
        )
    )


if __name__ == "__main__":
    main()
