"""Processes for the store's reliability tests (run as real OS processes)."""

from __future__ import annotations

import sys
import time

import geomstore
from tests.nets import BOX, mlp


def write(path: str, start: int, count: int, width: int) -> None:
    with geomstore.open(path) as store:
        for i in range(start, start + count):
            part = geomstore.partition(mlp((width, width), 3, seed=i), BOX, device="cpu")
            store.add(part, model="net", checkpoint=f"c{i}", step=i)


def read(path: str, seconds: float) -> None:
    """Query in a loop; exit 3 if a partition is ever seen partly written."""
    end = time.time() + seconds
    give_up = time.time() + max(seconds, 120.0)  # a busy machine: wait for the first commit
    seen = 0
    with geomstore.open(path, read_only=True) as store:
        while time.time() < end or (seen == 0 and time.time() < give_up):
            rows = store.sql(
                "SELECT p.partition_id, p.n_regions, p.n_edges, "
                "(SELECT count(*) FROM regions r WHERE r.partition_id = p.partition_id) AS nr, "
                "(SELECT count(*) FROM edges e WHERE e.partition_id = p.partition_id) AS ne "
                "FROM partitions p"
            ).table.to_pylist()
            orphans = (
                store.sql(
                    "SELECT count(*) AS n FROM regions WHERE partition_id NOT IN "
                    "(SELECT partition_id FROM partitions)"
                )
                .table.column("n")[0]
                .as_py()
            )
            for r in rows:
                if r["nr"] != r["n_regions"] or r["ne"] != r["n_edges"]:
                    print(f"partial partition {r}", file=sys.stderr)
                    sys.exit(3)
            if orphans:
                print(f"{orphans} orphan regions visible", file=sys.stderr)
                sys.exit(3)
            seen = max(seen, len(rows))
    print(seen)


def race(path: str, data_path: str, seed: int, checkpoint: str, start_at: float) -> None:
    """Open the store (a new one, maybe: both racers migrate it), then add one partition
    at ``start_at`` (a wall-clock time shared with the other racers)."""
    part = geomstore.partition(mlp((12, 12), 3, seed=seed), BOX, device="cpu")
    while time.time() < start_at - 1.0:
        time.sleep(0.01)
    with geomstore.open(path, data_path=data_path or None) as store:
        while time.time() < start_at:
            time.sleep(0.001)
        print(store.add(part, model="same", checkpoint=checkpoint, step=seed))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "write":
        write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif cmd == "read":
        read(sys.argv[2], float(sys.argv[3]))
    elif cmd == "race":
        race(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], float(sys.argv[6]))
