"""What the SQL sandbox costs: latency of Store.sql against the same SQL run unchecked.

Usage: python benchmarks/sandbox.py [--repeat 200] [--kinds duckdb,ducklake]

Prints one JSON object per store kind and query: p50 / p99 milliseconds through
``store.sql`` (parse with ``json_serialize_sql``, walk the tree, run as a relation with a
row cap under a timer) and through the trusted ``store.reader()`` (no checks), and the
checks' share. The store holds one partition of a seeded 2-64-64-3 MLP.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import geomstore
from tests.nets import BOX, mlp

QUERIES = {
    "select-1": "SELECT 1 AS one",
    "count-regions": "SELECT count(*) AS n FROM regions",
    "point-in-region": "SELECT region_id, label FROM regions "
    "WHERE ST_Intersects(geometry, ST_Point(0.1, 0.2))",
    "gs_partitions": "SELECT model, checkpoint, step, n_regions FROM gs_partitions",
}


def _ms(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--kinds", default="duckdb,ducklake")
    args = ap.parse_args()
    part = geomstore.partition(mlp((64, 64), out=3), BOX, device="cpu")
    for kind in args.kinds.split(","):
        root = Path(tempfile.mkdtemp())
        target = root / "s.duckdb" if kind == "duckdb" else root / "store"
        with geomstore.open(target) as store:
            store.add(part, model="net", checkpoint="c", step=0)
            con = store.reader()
            for name, sql in QUERIES.items():
                store.sql(sql)  # warm: the policy and a cursor
                checked, raw = [], []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    store.sql(sql)
                    checked.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    con.execute(sql).to_arrow_table()
                    raw.append(time.perf_counter() - t)
                p50, p99 = _ms(checked)
                r50, r99 = _ms(raw)
                print(
                    json.dumps(
                        {
                            "kind": kind,
                            "query": name,
                            "regions": part.n_regions,
                            "sql_p50_ms": round(p50, 3),
                            "sql_p99_ms": round(p99, 3),
                            "unchecked_p50_ms": round(r50, 3),
                            "unchecked_p99_ms": round(r99, 3),
                            "sandbox_overhead_p50_ms": round(p50 - r50, 3),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
