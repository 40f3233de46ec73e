"""The store with real DuckDB/DuckLake and real processes; no mocks."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

import geomstore
from geomstore.errors import (
    CheckpointConflictError,
    ReadOnlyQueryError,
    SchemaVersionError,
    StoreError,
)
from geomstore.store.connection import connect
from geomstore.store.schema import apply_migrations, current_version, migrations
from tests.nets import BOX, mlp

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def part() -> geomstore.Partition:
    return geomstore.partition(mlp((24, 24), 3, seed=1), BOX, device="cpu")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[geomstore.Store]:
    with geomstore.open(tmp_path / "store") as s:
        yield s


@pytest.fixture
def file_store(tmp_path: Path) -> Iterator[geomstore.Store]:
    with geomstore.open(tmp_path / "one.duckdb") as s:
        yield s


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.store_worker", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("kind", ["store", "file_store"])
def test_partition_roundtrip(
    kind: str, part: geomstore.Partition, request: pytest.FixtureRequest
) -> None:
    s = request.getfixturevalue(kind)
    pid = s.add(part, model="net", checkpoint="init", step=0, metrics={"acc": 0.5})
    row = s.sql("SELECT count(*) AS n, sum(ST_Area(geometry)) AS a FROM regions").table
    assert row.column("n")[0].as_py() == part.n_regions
    assert abs(row.column("a")[0].as_py() - 4.0) < 1e-9
    got = s.sql(
        "SELECT n_regions, n_edges, n_boundary FROM partitions WHERE partition_id = ?", [pid]
    ).table.to_pylist()
    assert got == [
        {
            "n_regions": part.n_regions,
            "n_edges": part.edges.num_rows,
            "n_boundary": part.boundary.num_rows,
        }
    ]
    # the same geometry comes back: areas and patterns per region
    back = s.sql("SELECT region_id, area, pattern, A FROM regions ORDER BY region_id").table
    assert back.column("area").to_pylist() == part.regions.column("area").to_pylist()
    assert back.column("pattern").to_pylist() == part.regions.column("pattern").to_pylist()
    assert back.column("A").to_pylist() == part.regions.column("A").to_pylist()
    # spatial functions work on the stored geometry
    hit = (
        s.sql(
            "SELECT count(*) AS n FROM edges WHERE ST_Intersects(geometry, "
            "ST_Buffer(ST_Point(0, 0), 0.1))"
        )
        .table.column("n")[0]
        .as_py()
    )
    assert hit > 0


def test_add_twice_does_not_duplicate_and_replace_rewrites(
    store: geomstore.Store, part: geomstore.Partition
) -> None:
    a = store.add(part, model="net", checkpoint="init")
    b = store.add(part, model="net", checkpoint="init")
    assert a == b
    c = store.add(part, model="net", checkpoint="init", replace=True)
    assert c == a
    n = store.sql("SELECT count(*) AS n FROM regions").table.column("n")[0].as_py()
    assert n == part.n_regions
    assert store.sql("SELECT count(*) AS n FROM checkpoints").table.column("n")[0].as_py() == 1
    other = store.add(part, model="net", checkpoint="later", step=10)
    assert other != a
    assert store.sql("SELECT count(*) AS n FROM partitions").table.column("n")[0].as_py() == 2


def test_sql_is_read_only_and_capped(store: geomstore.Store, part: geomstore.Partition) -> None:
    store.add(part, model="net", checkpoint="init")
    res = store.sql("SELECT region_id FROM regions", limit=5)
    assert res.table.num_rows == 5 and res.truncated
    assert not store.sql("SELECT 1 AS one").truncated
    with pytest.raises(ReadOnlyQueryError, match="only SELECT"):
        store.sql("DELETE FROM regions")
    with pytest.raises(ReadOnlyQueryError, match="exactly one statement"):
        store.sql("SELECT 1; SELECT 2")
    with pytest.raises(ReadOnlyQueryError, match="read-only path"):
        store.sql("SELECT * FROM read_csv('/etc/hostname')")
    assert store.sql("SELECT count(*) AS n FROM regions").table.column("n")[0].as_py() > 0


def test_migrations_upgrade_an_old_store_and_keep_its_rows(
    tmp_path: Path, part: geomstore.Partition
) -> None:
    path = tmp_path / "old"
    (path / "data").mkdir(parents=True)
    con = connect()
    con.execute(f"ATTACH 'ducklake:sqlite:{path}/catalog.sqlite' AS gs (DATA_PATH '{path}/data/')")
    con.execute("USE gs")
    assert apply_migrations(con, upto=1) == [1]
    assert apply_migrations(con, upto=1) == []  # idempotent
    assert current_version(con) == 1
    con.close()
    # a store at schema 1 cannot be opened read-only (it must be upgraded first) ...
    with pytest.raises(SchemaVersionError, match=r"needs \d"):
        geomstore.open(path, read_only=True)
    # ... fill it through the version-1 tables, then upgrade by opening it
    con = connect()
    con.execute(f"ATTACH 'ducklake:sqlite:{path}/catalog.sqlite' AS gs (DATA_PATH '{path}/data/')")
    con.execute("USE gs")
    con.register("r", part.regions)
    con.execute(
        "INSERT INTO regions SELECT 'p1', region_id, ST_GeomFromWKB(geometry), area, "
        "centroid_u0, centroid_u1, n_vertices, pattern::BLOB, A::DOUBLE[], c::DOUBLE[], "
        "label, slope_norm FROM r"
    )
    con.close()
    with geomstore.open(path) as s:
        assert s.schema_version == migrations()[-1].version
        rows = s.sql("SELECT count(*) AS n, sum(area) AS a FROM regions").table.to_pylist()[0]
        assert rows["n"] == part.n_regions and abs(rows["a"] - 4.0) < 1e-9
        assert s.sql("SELECT count(*) AS n FROM points").table.column("n")[0].as_py() == 0
        ledger = s.sql("SELECT version FROM schema_migrations ORDER BY version").table
        assert ledger.column("version").to_pylist() == [m.version for m in migrations()]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new"
    geomstore.open(path).close()
    con = connect()
    con.execute(f"ATTACH 'ducklake:sqlite:{path}/catalog.sqlite' AS gs (DATA_PATH '{path}/data/')")
    con.execute("INSERT INTO gs.schema_migrations VALUES (99, 'future', now()::TIMESTAMP)")
    con.close()
    with pytest.raises(SchemaVersionError, match="newer than this geomstore"):
        geomstore.open(path)


def test_foreign_and_wrong_targets_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="without a geomstore catalog"):
        geomstore.open(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    text = tmp_path / "file.txt"
    text.write_text("x")
    with pytest.raises(StoreError, match=r"not a \.duckdb file"):
        geomstore.open(text)
    with pytest.raises(StoreError, match="no store at"):
        geomstore.open(tmp_path / "missing", read_only=True)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "catalog.sqlite").write_bytes(b"not a sqlite file at all" * 10)
    with pytest.raises(StoreError, match="cannot open the store"):
        geomstore.open(corrupt)


def test_writer_and_two_readers_never_see_a_partial_partition(tmp_path: Path) -> None:
    path = str(tmp_path / "shared")
    geomstore.open(path).close()
    writer = _spawn("write", path, "0", "6", "48")
    readers = [_spawn("read", path, "12") for _ in range(2)]
    _, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    seen = []
    for r in readers:
        rout, rerr = r.communicate(timeout=300)
        assert r.returncode == 0, rerr
        seen.append(int(rout.strip().splitlines()[-1]))
    assert max(seen) >= 1, "the readers never saw a partition while the writer wrote"
    with geomstore.open(path, read_only=True) as s:
        n = s.sql("SELECT count(*) AS n FROM partitions").table.column("n")[0].as_py()
        assert n == 6


def test_killed_writer_leaves_a_consistent_store(tmp_path: Path) -> None:
    path = str(tmp_path / "killed")
    with geomstore.open(path) as s:
        s.add(geomstore.partition(mlp((8, 8), 2), BOX, device="cpu"), model="n", checkpoint="a")
    writer = _spawn("write", path, "100", "50", "200")
    time.sleep(6.0)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    with geomstore.open(path) as s:
        rows = s.sql(
            "SELECT p.n_regions, (SELECT count(*) FROM regions r "
            "WHERE r.partition_id = p.partition_id) AS nr FROM partitions p"
        ).table.to_pylist()
        assert rows and all(r["n_regions"] == r["nr"] for r in rows)
        orphans = (
            s.sql(
                "SELECT count(*) AS n FROM regions WHERE partition_id NOT IN "
                "(SELECT partition_id FROM partitions)"
            )
            .table.column("n")[0]
            .as_py()
        )
        assert orphans == 0
        s.add(
            geomstore.partition(mlp((8, 8), 2, seed=5), BOX, device="cpu"),
            model="n",
            checkpoint="b",
        )


def test_two_writers_at_once_both_land(tmp_path: Path) -> None:
    path = str(tmp_path / "two")
    geomstore.open(path).close()
    a = _spawn("write", path, "0", "3", "32")
    b = _spawn("write", path, "10", "3", "32")
    for w in (a, b):
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    with geomstore.open(path, read_only=True) as s:
        assert s.sql("SELECT count(*) AS n FROM partitions").table.column("n")[0].as_py() == 6


def test_a_reader_and_a_writer_of_one_process_survive_another_process_writing(
    tmp_path: Path,
) -> None:
    """A notebook (or the query service) reads a store, opens it for writing too, and a
    worker process writes meanwhile. Opening the catalog for WAL mode with Python's own
    SQLite while DuckDB's SQLite held it released DuckDB's file locks, and the reader then
    failed for good with "database disk image is malformed"."""
    path = str(tmp_path / "shared")
    geomstore.open(path).close()
    with geomstore.open(path, read_only=True) as reader:
        assert reader.sql("SELECT count(*) AS n FROM partitions").table.column("n")[0].as_py() == 0
        with geomstore.open(path) as writer:
            writer.add(
                geomstore.partition(mlp((6,), 2), BOX, device="cpu"), model="n", checkpoint="a"
            )
        for start in (0, 10):
            other = _spawn("write", path, str(start), "2", "8")
            _, err = other.communicate(timeout=300)
            assert other.returncode == 0, err
            n = reader.sql("SELECT count(*) AS n FROM partitions").table.column("n")[0].as_py()
            assert n == 3 + start // 5
    with geomstore.open(path, read_only=True) as again:
        assert again.sql("SELECT count(*) AS n FROM partitions").table.column("n")[0].as_py() == 5
    con = sqlite3.connect(Path(path) / "catalog.sqlite")  # no store of ours holds it now
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        con.close()


def test_export_writes_geoparquet(
    store: geomstore.Store, part: geomstore.Partition, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    store.add(part, model="net", checkpoint="init")
    files = store.export(tmp_path / "out")
    regions = next(f for f in files if f.name == "regions.parquet")
    meta = pq.read_schema(regions).metadata or {}
    assert b"geo" in meta
    assert pq.read_table(regions).num_rows == part.n_regions


def test_sqlalchemy_engine_reads_the_store(
    store: geomstore.Store, part: geomstore.Partition
) -> None:
    import sqlalchemy

    store.add(part, model="net", checkpoint="init")
    eng = store.engine()
    with eng.connect() as c:
        n = c.execute(sqlalchemy.text("SELECT count(*) FROM regions")).scalar()
        area = c.execute(sqlalchemy.text("SELECT sum(ST_Area(geometry)) FROM regions")).scalar()
    eng.dispose()
    assert n == part.n_regions
    assert abs(area - 4.0) < 1e-9


def test_points_are_projected_and_stored(store: geomstore.Store) -> None:
    import numpy as np

    sl = geomstore.Slice.through([0, 0, 0], [1, 0, 0], [0, 1, 0], name="xy")
    x = np.array([[0.5, 0.25, 2.0], [0.1, 0.9, -1.0]])
    did = store.add_points("toy", sl, x, labels=[0, 1], split="test")
    rows = store.sql(
        "SELECT u0, u1, distance, label, split, ST_X(geometry) AS gx FROM points "
        "WHERE dataset_id = ? ORDER BY point_id",
        [did],
    ).table.to_pylist()
    assert [r["label"] for r in rows] == [0, 1] and rows[0]["split"] == "test"
    assert abs(rows[0]["u0"] - 0.5) < 1e-12 and abs(rows[0]["distance"] - 2.0) < 1e-12
    assert abs(rows[1]["u1"] - 0.9) < 1e-12 and abs(rows[1]["gx"] - 0.1) < 1e-12
    store.add_points("toy", sl, x, labels=[0, 1], split="test")  # rewrite, not duplicate
    assert store.sql("SELECT count(*) AS n FROM points").table.column("n")[0].as_py() == 2


def test_export_to_one_duckdb_file(
    store: geomstore.Store, part: geomstore.Partition, tmp_path: Path
) -> None:
    import duckdb

    store.add(part, model="net", checkpoint="init")
    (path,) = store.export(tmp_path / "copy.duckdb")
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM regions").fetchone() == (part.n_regions,)
    finally:
        con.close()
    with pytest.raises(StoreError, match="exists"):
        store.export(path)


def test_postgres_catalog_with_a_real_server(tmp_path: Path, part: geomstore.Partition) -> None:
    from tests.pgserver import postgres_server

    data = tmp_path / "pgdata-files"
    with postgres_server(tmp_path / "pg") as dsn:
        target = f"postgres:{dsn}"
        with pytest.raises(StoreError, match="needs data_path="):
            geomstore.open(target)
        with geomstore.open(target, data_path=data) as s:
            pid = s.add(part, model="net", checkpoint="init", step=0)
            n = s.sql("SELECT count(*) AS n FROM regions WHERE partition_id = ?", [pid]).table
            assert n.column("n")[0].as_py() == part.n_regions
        with geomstore.open(target, data_path=data, read_only=True) as s:
            a = s.sql("SELECT sum(ST_Area(geometry)) AS a FROM regions").table
            assert abs(a.column("a")[0].as_py() - 4.0) < 1e-9
            assert s.schema_version == migrations()[-1].version


def test_read_only_file_system_gives_a_clear_error_and_changes_nothing(
    tmp_path: Path, part: geomstore.Partition
) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a tmpfs needs root")
    try:
        with geomstore.open(mnt / "s") as s:
            s.add(part, model="net", checkpoint="init")
        before = {p: p.read_bytes() for p in (mnt / "s").rglob("*") if p.is_file()}
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        for ro in (False, True):
            with pytest.raises(StoreError, match="read-only file system"):
                geomstore.open(mnt / "s", read_only=ro)
        after = {p: p.read_bytes() for p in (mnt / "s").rglob("*") if p.is_file()}
        assert after == before
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_missing_extension_names_its_package() -> None:
    import duckdb

    from geomstore.errors import MissingExtensionError
    from geomstore.store.connection import _load

    con = duckdb.connect()
    try:
        with pytest.raises(
            MissingExtensionError, match=r"pip install duckdb-extension-nothing==1\.5\.5"
        ):
            _load(con, "nothing_such", "duckdb-extension-nothing==1.5.5")
    finally:
        con.close()


@pytest.mark.parametrize("kind", ["store", "file_store"])
def test_sql_helpers_view_and_lc_macro(
    kind: str, part: geomstore.Partition, request: pytest.FixtureRequest
) -> None:
    import numpy as np

    from geomstore.queries import local_complexity

    s = request.getfixturevalue(kind)
    pid = s.add(part, model="net", checkpoint="init", step=5)
    view = s.sql("SELECT model, checkpoint, step, n_regions FROM gs_partitions").table
    assert view.to_pylist() == [
        {"model": "net", "checkpoint": "init", "step": 5, "n_regions": part.n_regions}
    ]
    u = np.random.default_rng(0).uniform(-0.9, 0.9, (10, 2))
    lc = local_complexity(s, model="net", points=u, radius=0.15).column("n_neurons")
    for i, (x, y) in enumerate(u):
        got = s.sql("SELECT n_neurons FROM gs_lc(?, ?, ?, 0.15)", [pid, x, y]).table
        assert got.column("n_neurons")[0].as_py() == lc[i].as_py()


def test_load_partition_gives_back_the_same_tables(
    store: geomstore.Store, part: geomstore.Partition
) -> None:
    import numpy as np

    pid = store.add(part, model="net", checkpoint="init")
    back = store.load_partition(pid)
    assert back.slice == part.slice and back.n_regions == part.n_regions
    for col in ("region_id", "area", "pattern", "A", "c", "label", "geometry"):
        assert back.regions.column(col).to_pylist() == part.regions.column(col).to_pylist(), col
    assert np.array_equal(back.states, part.states)
    # exactly the tables written, types included (pattern: fixed_size_binary)
    assert back.regions.equals(part.regions) and back.edges.equals(part.edges)
    order = [("region_id", "ascending"), ("u0_a", "ascending"), ("u1_a", "ascending")]
    assert back.boundary.sort_by(order).equals(part.boundary.sort_by(order))
    assert back.edges.column("length").to_pylist() == part.edges.column("length").to_pylist()
    assert sorted(back.boundary.column("length").to_pylist()) == sorted(
        part.boundary.column("length").to_pylist()
    )
    a1, c1 = back.affine_maps()
    a0, c0 = part.affine_maps()
    assert np.array_equal(a1, a0) and np.array_equal(c1, c0)
    with pytest.raises(StoreError, match="no partition"):
        store.load_partition("nope")


def test_a_loaded_partition_verifies_against_its_own_checkpoint(tmp_path: Path) -> None:
    """Each checkpoint's weight hash travels with its partitions (not the model's first)."""
    nets = [mlp((10, 10), 3, seed=s) for s in (31, 32)]
    with geomstore.open(tmp_path / "store") as store:
        ids = [
            store.add(geomstore.partition(n, BOX, device="cpu"), model="m", checkpoint=f"c{i}")
            for i, n in enumerate(nets)
        ]
        for pid, net, other in zip(ids, nets, nets[::-1], strict=True):
            part = store.load_partition(pid)
            report = part.verify(net)
            assert report.ok, str(report)
            assert (part.patterns([0, 1], net=net) == part.states[[0, 1]]).all()
            with pytest.raises(geomstore.GeomstoreError, match="weights differ"):
                part.verify(other)
        with pytest.raises(geomstore.GeomstoreError, match="pass net="):
            store.load_partition(ids[0]).verify()


def test_bad_arguments_to_add_are_refused_before_anything_is_written(
    store: geomstore.Store, part: geomstore.Partition
) -> None:
    before = store.partitions().num_rows
    cases = [
        (("hello",), {"model": "m", "checkpoint": "c"}, "takes a Partition"),
        ((part,), {"model": "", "checkpoint": "c"}, "model= must be a non-empty name"),
        ((part,), {"model": "m", "checkpoint": "  "}, "checkpoint= must be a non-empty"),
        ((part,), {"model": "m", "checkpoint": "c", "metrics": {"acc": "high"}}, "numbers"),
    ]
    for args, kwargs, msg in cases:
        with pytest.raises(StoreError, match=msg):
            store.add(*args, **kwargs)  # type: ignore[arg-type]
    assert store.partitions().num_rows == before
    import numpy as np

    pid = store.add(part, model="m", checkpoint="c", metrics={"acc": np.float32(0.5), "x": None})
    assert pid in store.partitions().column("partition_id").to_pylist()


def test_nan_weights_and_levels_are_named() -> None:
    import torch

    from geomstore.errors import GeomstoreError, UnsupportedModelError

    net = mlp((8,), 2, seed=1)
    with pytest.raises(GeomstoreError, match="levels must be finite"):
        geomstore.partition(net, BOX, device="cpu", levels=[float("nan")])
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    with pytest.raises(UnsupportedModelError, match=r"NaN or infinite values \(0.weight\)"):
        geomstore.partition(net, BOX, device="cpu")


@pytest.mark.parametrize("name", ["it's store", "it's.duckdb"])
def test_a_quote_in_a_path_is_one_path(
    tmp_path: Path, part: geomstore.Partition, name: str
) -> None:
    with geomstore.open(tmp_path / name) as s:
        s.add(part, model="m", checkpoint="c")
        assert s.partitions().num_rows == 1
        files = s.export(tmp_path / "export it's")
        assert (tmp_path / "export it's" / "regions.parquet") in files
    with geomstore.open(tmp_path / "plain", data_path=str(tmp_path / "data it's")) as s:
        s.add(part, model="m", checkpoint="c")
    with geomstore.open(tmp_path / "plain", read_only=True) as s:
        assert s.sql("SELECT count(*) AS n FROM regions").table.column("n")[0].as_py() == (
            part.n_regions
        )
    assert any((tmp_path / "data it's").rglob("*.parquet"))


def test_someone_elses_database_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    mine = tmp_path / "mine.duckdb"
    con = duckdb.connect(str(mine))
    con.execute("CREATE TABLE experiments (x INTEGER)")
    con.close()
    folder = tmp_path / "lake"
    folder.mkdir()
    lite = sqlite3.connect(folder / "catalog.sqlite")
    lite.execute("CREATE TABLE t (x)")
    lite.commit()
    lite.close()
    before = {p: p.read_bytes() for p in (mine, folder / "catalog.sqlite")}
    with pytest.raises(StoreError, match=r"'experiments'.*left unchanged"):
        geomstore.open(mine)
    for read_only in (False, True):
        with pytest.raises(StoreError, match=r"not a geomstore \(DuckLake\) catalog"):
            geomstore.open(folder, read_only=read_only)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in folder.iterdir()) == ["catalog.sqlite"]


def test_bad_points_are_refused_by_name(store: geomstore.Store) -> None:
    import numpy as np

    with pytest.raises(StoreError, match="2 of the 2 points hold NaN or inf"):
        store.add_points("bad", BOX, np.full((2, 2), np.nan))
    with pytest.raises(StoreError, match=r"shape \(n, 2\).*got \(5, 3\)"):
        store.add_points("bad", BOX, np.zeros((5, 3)))
    assert store.sql("SELECT count(*) AS n FROM datasets").table.column("n")[0].as_py() == 0


def test_threads_sharing_a_store_take_turns_writing(store: geomstore.Store) -> None:
    import threading

    parts = [geomstore.partition(mlp((6, 6), 2, seed=i), BOX, device="cpu") for i in range(4)]
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            store.add(parts[i], model="m", checkpoint=f"c{i}", step=i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert store.partitions().column("checkpoint").to_pylist() == ["c0", "c1", "c2", "c3"]


def test_one_checkpoint_name_holds_one_checkpoint(tmp_path: Path) -> None:
    """Other weights under a stored (model, checkpoint) name are refused, or with
    replace=True replace the old checkpoint on every slice; other names of one model may
    hold other architectures (a width sweep)."""
    big = geomstore.Slice.box((-2, -2), (2, 2), name="big")
    first, second = mlp((6, 6), 2, seed=1), mlp((6, 6), 2, seed=2)
    with geomstore.open(tmp_path / "s") as s:
        for sl in (BOX, big):
            s.add(geomstore.partition(first, sl, device="cpu"), model="m", checkpoint="c0")
        s.add(geomstore.partition(mlp((9,), 2), BOX, device="cpu"), model="m", checkpoint="w9")
        before = s.partitions().to_pylist()
        new = geomstore.partition(second, BOX, device="cpu")
        with pytest.raises(CheckpointConflictError, match=r"'c0' of model 'm'.*2 partition"):
            s.add(new, model="m", checkpoint="c0")
        other = geomstore.partition(mlp((5,), 2), BOX, device="cpu")
        with pytest.raises(CheckpointConflictError, match="another architecture"):
            s.add(other, model="m", checkpoint="c0")
        assert s.partitions().to_pylist() == before
        s.add(new, model="m", checkpoint="c0", replace=True)
        rows = s.partitions(model="m", checkpoints=["c0"]).to_pylist()
        assert [(r["slice"], r["n_regions"]) for r in rows] == [(BOX.name, new.n_regions)]
        n = s.sql("SELECT count(*) AS n FROM regions").table.column("n")[0].as_py()
        assert n == new.n_regions + before[-1]["n_regions"]
        # replacing w9 by the (6, 6) net leaves no model row of the (9,) architecture
        s.add(new, model="m", checkpoint="w9", replace=True)
        assert s.sql("SELECT count(*) AS n FROM models").table.column("n")[0].as_py() == 1


@pytest.mark.parametrize(
    "dsn",
    [
        "postgres:host=127.0.0.1 port=1 dbname=geo user=me password=Planted-Secret-42",
        "postgres:host=127.0.0.1 port=1 dbname=geo user=me password='Planted-Secret-42'",
        "postgresql://me:Planted-Secret-42@127.0.0.1:1/geo",
    ],
)
def test_a_catalog_password_never_comes_back_in_errors(tmp_path: Path, dsn: str) -> None:
    with pytest.raises(StoreError) as info:
        geomstore.open(dsn, data_path=str(tmp_path / "data"))
    assert "Planted-Secret-42" not in str(info.value)
    assert "127.0.0.1" in str(info.value)  # the message still says where it failed
    res = subprocess.run(
        [sys.executable, "-m", "geomstore", "partitions", dsn],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GEOMSTORE_DATA_PATH": str(tmp_path / "data")},
    )
    assert res.returncode == 1 and res.stderr.startswith("Error: ")
    assert "Planted-Secret-42" not in res.stderr + res.stdout


def _race(path: str, data_path: str, racers: list[tuple[int, str]]) -> None:
    start = time.time() + 12.0  # every racer has imported torch and partitioned by then
    procs = [_spawn("race", path, data_path, str(seed), ckpt, str(start)) for seed, ckpt in racers]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


def _counts(path: str, data_path: str | None = None) -> dict[str, int]:
    with geomstore.open(path, read_only=True, data_path=data_path) as s:
        row = s.sql(
            "SELECT (SELECT count(*) FROM models) AS models, "
            "(SELECT count(*) FROM checkpoints) AS checkpoints, "
            "(SELECT count(*) FROM partitions) AS partitions, "
            "(SELECT count(*) FROM regions) AS regions"
        ).table.to_pylist()[0]
    return {k: int(v) for k, v in row.items()}


@pytest.mark.parametrize("catalog", ["sqlite", "postgres"])
def test_racing_writers_write_each_row_once(tmp_path: Path, catalog: str) -> None:
    """Processes that open a new store at once and add the same partition, or two
    checkpoints of one new model, at the same moment: each row lands once."""
    from tests.pgserver import postgres_server

    with contextlib.ExitStack() as stack:
        if catalog == "postgres":
            dsn = stack.enter_context(postgres_server(tmp_path / "pg"))
            path, data = f"postgres:{dsn}", str(tmp_path / "data")
        else:
            path, data = str(tmp_path / "lake"), ""
        _race(path, data, [(1, "c1"), (1, "c1"), (2, "c2")])
        counts = _counts(path, data or None)
        one = geomstore.partition(mlp((12, 12), 3, seed=1), BOX, device="cpu").n_regions
        two = geomstore.partition(mlp((12, 12), 3, seed=2), BOX, device="cpu").n_regions
        assert counts == {"models": 1, "checkpoints": 2, "partitions": 2, "regions": one + two}
