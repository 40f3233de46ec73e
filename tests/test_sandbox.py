"""The SQL sandbox: every attack of the list, against every kind of store, is refused.

One contract test body runs each attack query against a ``.duckdb`` store, a DuckLake
directory (SQLite catalog) and a DuckLake on a real PostgreSQL server. Secrets are
planted in files of every kind the attacks try to read (text, CSV, JSON, Parquet, SQLite,
DuckDB) and in the environment; each attack must raise a typed one-line error, the secret
must never come back (in rows or in the message), the store's tables must be unchanged and
no file may be written. Legitimate queries (joins, spatial functions, the store's views
and macros, range) still work.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import geomstore
from geomstore.errors import (
    GeomstoreError,
    QueryTimeoutError,
    ReadOnlyQueryError,
    SQLError,
    SQLRefusedError,
)
from tests.nets import BOX, mlp

ROOT = Path(__file__).resolve().parents[1]
SECRET = "GS-SANDBOX-SECRET-5c1e0f"
KINDS = ["duckdb", "ducklake", "postgres"]
DATA_TABLES = ("models", "checkpoints", "slices", "partitions", "regions", "edges", "boundary")


@dataclass
class Planted:
    """Files that hold the secret, and a folder no query may write into."""

    dir: Path
    txt: Path
    csv: Path
    json: Path
    parquet: Path
    sqlite: Path
    duckdb: Path
    out: Path


@dataclass
class Target:
    store: geomstore.Store
    kind: str
    pid: str
    dsn: str


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Planted]:
    d = tmp_path_factory.mktemp("secrets")
    p = Planted(
        dir=d,
        txt=d / "secret.txt",
        csv=d / "secret.csv",
        json=d / "secret.json",
        parquet=d / "secret.parquet",
        sqlite=d / "secret.sqlite",
        duckdb=d / "secret.duckdb",
        out=tmp_path_factory.mktemp("out"),
    )
    p.txt.write_text(f"{SECRET}\n")
    p.csv.write_text(f"name,value\nkey,{SECRET}\n")
    p.json.write_text(json.dumps([{"value": SECRET}]))
    pq.write_table(pa.table({"value": [SECRET]}), p.parquet)
    con = sqlite3.connect(p.sqlite)
    con.execute("CREATE TABLE secrets (value TEXT)")
    con.execute("INSERT INTO secrets VALUES (?)", [SECRET])
    con.commit()
    con.close()
    dcon = duckdb.connect(str(p.duckdb))
    dcon.execute(f"CREATE TABLE secrets AS SELECT '{SECRET}' AS value")
    dcon.close()
    os.environ["GEOMSTORE_SANDBOX_SECRET"] = SECRET
    yield p
    os.environ.pop("GEOMSTORE_SANDBOX_SECRET", None)


@pytest.fixture(scope="module", params=KINDS)
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """One store of each kind with one partition of a 2-8-8-3 MLP and a data set."""
    part = geomstore.partition(mlp((8, 8), out=3), BOX, device="cpu")
    root = tmp_path_factory.mktemp(f"store-{request.param}")
    with _server(request.param, root) as dsn:
        if request.param == "duckdb":
            store = geomstore.open(root / "store.duckdb")
        elif request.param == "ducklake":
            store = geomstore.open(root / "store")
        else:
            store = geomstore.open(f"postgres:{dsn}", data_path=root / "data")
        try:
            pid = store.add(part, model="net", checkpoint="init", step=0)
            store.add_points("pts", BOX, [[0.1, 0.2], [-0.5, 0.5]], labels=[0, 1])
            yield Target(store, request.param, pid, dsn)
        finally:
            store.close()


class _server:
    """A PostgreSQL server for the postgres kind; nothing for the others."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        self.cm: AbstractContextManager[str] | None = None

    def __enter__(self) -> str:
        if self.kind != "postgres":
            return "dbname=none"
        from tests.pgserver import postgres_server

        self.cm = postgres_server(self.root / "pg")
        return self.cm.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.cm is not None:
            self.cm.__exit__(*exc)


def fingerprint(t: Target) -> tuple[object, ...]:
    """Row counts of every table, the partition ids, the tables and the locked settings."""
    con = t.store.reader()
    counts = tuple(con.execute(f"SELECT count(*) FROM {name}").fetchone() for name in DATA_TABLES)
    ids = con.execute("SELECT list(partition_id ORDER BY partition_id) FROM partitions").fetchone()
    tables = con.execute(
        "SELECT list(table_name ORDER BY table_name) FROM duckdb_tables() WHERE database_name='gs'"
    ).fetchone()
    settings = con.execute(
        "SELECT current_setting('enable_external_access'), current_setting('lock_configuration')"
    ).fetchone()
    return counts, ids, tables, settings


# (id, query, expected error); {txt} etc. are the planted files, {dsn} the catalog server
REFUSED = SQLRefusedError
NOT_RUN = (SQLRefusedError, SQLError)  # refused by the sandbox or by DuckDB's own parser
ATTACKS: list[tuple[str, str, type[GeomstoreError] | tuple[type[GeomstoreError], ...]]] = [
    ("bare-quoted-path", "SELECT * FROM '{txt}'", REFUSED),
    ("double-quoted-path", 'SELECT * FROM "{csv}"', REFUSED),
    ("from-first-path", "FROM '{csv}'", REFUSED),
    ("file-url", "SELECT * FROM 'file://{csv}'", REFUSED),
    ("path-in-join", "SELECT * FROM regions, '{csv}'", REFUSED),
    ("read_text", "SELECT * FROM read_text('{txt}')", REFUSED),
    ("read_text-list", "SELECT content FROM read_text(['{txt}'])", REFUSED),
    ("read_text-scalar", "SELECT read_text('{txt}')", REFUSED),
    ("read_blob", "SELECT content FROM read_blob('{txt}')", REFUSED),
    ("read_csv", "SELECT * FROM read_csv('{csv}')", REFUSED),
    ("read_csv_auto-upper", "SELECT * FROM READ_CSV_AUTO('{csv}')", REFUSED),
    ("sniff_csv", "SELECT * FROM sniff_csv('{csv}')", REFUSED),
    ("read_json", "SELECT * FROM read_json('{json}')", REFUSED),
    ("read_json_auto", "SELECT * FROM read_json_auto('{json}')", REFUSED),
    ("read_parquet", "SELECT * FROM read_parquet('{parquet}')", REFUSED),
    ("parquet_scan", "SELECT * FROM parquet_scan('{parquet}')", REFUSED),
    ("parquet_metadata", "SELECT * FROM parquet_metadata('{parquet}')", REFUSED),
    ("read_duckdb", "SELECT * FROM read_duckdb('{duckdb}')", REFUSED),
    ("glob", "SELECT * FROM glob('{dir}/*')", REFUSED),
    ("st_read", "SELECT * FROM ST_Read('{csv}')", REFUSED),
    ("st_read_meta", "SELECT * FROM ST_Read_Meta('{csv}')", REFUSED),
    ("sqlite_scan", "SELECT * FROM sqlite_scan('{sqlite}', 'secrets')", REFUSED),
    ("sqlite_attach-select", "SELECT * FROM sqlite_attach('{sqlite}')", REFUSED),
    ("sqlite_attach-call", "CALL sqlite_attach('{sqlite}')", REFUSED),
    (
        "postgres_scan",
        "SELECT * FROM postgres_scan('{dsn}', 'public', 'ducklake_metadata')",
        REFUSED,
    ),
    ("postgres_query", "SELECT * FROM postgres_query('{dsn}', 'SELECT 1')", REFUSED),
    ("attach-sqlite", "ATTACH '{sqlite}' AS s (TYPE sqlite)", REFUSED),
    ("attach-duckdb", "ATTACH '{duckdb}' AS s", REFUSED),
    ("ducklake-metadata", "SELECT * FROM __ducklake_metadata_gs.ducklake_data_file", REFUSED),
    ("other-catalog", "SELECT * FROM system.main.duckdb_settings()", REFUSED),
    ("duckdb_settings", "SELECT * FROM duckdb_settings()", REFUSED),
    ("duckdb_databases", "SELECT * FROM duckdb_databases()", REFUSED),
    ("query-string", "SELECT * FROM query('SELECT * FROM read_text(''{txt}'')')", REFUSED),
    ("query_table", "SELECT * FROM query_table('{csv}')", REFUSED),
    ("getenv", "SELECT getenv('GEOMSTORE_SANDBOX_SECRET')", (SQLRefusedError, SQLError)),
    ("current_setting", "SELECT current_setting('allowed_directories')", REFUSED),
    ("in-scalar-subquery", "SELECT (SELECT content FROM read_text('{txt}'))", REFUSED),
    ("in-exists", "SELECT 1 WHERE EXISTS (SELECT * FROM read_csv('{csv}'))", REFUSED),
    ("in-lateral", "SELECT * FROM range(1) r, LATERAL (SELECT * FROM read_csv('{csv}'))", REFUSED),
    ("in-cte", "WITH s AS (SELECT * FROM read_text('{txt}')) SELECT * FROM s", REFUSED),
    ("cte-named-path", 'WITH "{txt}" AS (SELECT 1) SELECT * FROM "{txt}"', REFUSED),
    (
        "cte-out-of-scope",
        "SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) a, '{txt}'",
        REFUSED,
    ),
    ("union", "SELECT 'a' UNION ALL SELECT content FROM read_text('{txt}')", REFUSED),
    (
        "in-limit",
        "SELECT * FROM regions LIMIT (SELECT length(content) FROM read_text('{txt}'))",
        REFUSED,
    ),
    (
        "in-order-by",
        "SELECT * FROM regions ORDER BY (SELECT content FROM read_text('{txt}'))",
        REFUSED,
    ),
    (
        "in-window-frame",
        "SELECT sum(area) OVER (ORDER BY area ROWS BETWEEN "
        "(SELECT length(content) FROM read_text('{txt}')) PRECEDING AND CURRENT ROW) FROM regions",
        REFUSED,
    ),
    (
        "in-named-window",
        "SELECT sum(area) OVER w FROM regions "
        "WINDOW w AS (ORDER BY (SELECT content FROM read_text('{txt}')))",
        REFUSED,
    ),
    (
        "in-having",
        "SELECT label FROM regions GROUP BY label HAVING max(area) > "
        "(SELECT length(content) FROM read_text('{txt}'))",
        REFUSED,
    ),
    (
        "in-filter",
        "SELECT count(*) FILTER (WHERE '{txt}' IN (SELECT file FROM glob('*'))) FROM regions",
        REFUSED,
    ),
    (
        "in-lambda",
        "SELECT list_transform([1], x -> (SELECT content FROM read_text('{txt}')))",
        REFUSED,
    ),
    (
        "in-values",
        "SELECT * FROM (VALUES ((SELECT content FROM read_text('{txt}')))) v(a)",
        REFUSED,
    ),
    ("in-join-on", "SELECT 1 FROM regions a JOIN read_csv('{csv}') b ON true", REFUSED),
    ("method-call", "SELECT '{txt}'.read_text()", (SQLRefusedError, SQLError)),
    ("describe-file", "DESCRIBE '{csv}'", REFUSED),
    ("summarize-file", "SUMMARIZE '{csv}'", REFUSED),
    ("install", "INSTALL httpfs", REFUSED),
    ("load", "LOAD httpfs", REFUSED),
    ("set-access", "SET enable_external_access = true", REFUSED),
    ("set-memory", "SET memory_limit = '100GB'", REFUSED),
    ("reset", "RESET memory_limit", REFUSED),
    ("pragma", "PRAGMA database_list", REFUSED),
    ("pragma-profiling", "PRAGMA enable_profiling", REFUSED),
    ("copy-to", "COPY regions TO '{out}/leak.csv'", REFUSED),
    ("copy-query-to", "COPY (SELECT 1) TO '{out}/leak.parquet' (FORMAT parquet)", REFUSED),
    ("export-database", "EXPORT DATABASE '{out}/dump'", REFUSED),
    ("delete-in-cte", "WITH d AS (DELETE FROM regions RETURNING *) SELECT * FROM d", NOT_RUN),
    (
        "insert-in-cte",
        "WITH i AS (INSERT INTO models (name) VALUES ('x') RETURNING *) SELECT * FROM i",
        NOT_RUN,
    ),
    ("delete", "DELETE FROM regions", REFUSED),
    ("update", "UPDATE partitions SET n_regions = 0", REFUSED),
    ("drop", "DROP TABLE regions", REFUSED),
    ("create", "CREATE TABLE t AS SELECT 1", REFUSED),
    ("create-secret", "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')", REFUSED),
    ("detach", "DETACH gs", REFUSED),
    ("checkpoint", "CHECKPOINT", REFUSED),
    ("two-statements", "SELECT 1; DROP TABLE regions", REFUSED),
    ("comment-trick", "SELECT 1 --\n; SELECT * FROM read_text('{txt}')", REFUSED),
    ("sleep", "SELECT sleep_ms(60000)", REFUSED),
    ("sequence", "SELECT nextval('s')", REFUSED),
    ("count-range-1e12", "SELECT count(*) FROM range(1000000000000)", QueryTimeoutError),
    (
        "cross-join",
        "SELECT max(a.area + b.area + c.area + d.area + e.area + f.area) "
        "FROM regions a, regions b, regions c, regions d, regions e, regions f, range(1000000) g",
        QueryTimeoutError,
    ),
    (
        "recursive-cte",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
        (QueryTimeoutError, SQLError),
    ),
    (
        "memory",
        "SELECT list(x) FROM range(4000000000) t(x)",
        (QueryTimeoutError, SQLError),
    ),
]


def _fill(query: str, p: Planted, t: Target) -> str:
    return query.format(
        txt=p.txt,
        csv=p.csv,
        json=p.json,
        parquet=p.parquet,
        sqlite=p.sqlite,
        duckdb=p.duckdb,
        dir=p.dir,
        out=p.out,
        dsn=t.dsn,
    )


def test_attack_list_is_long_enough() -> None:
    assert len(ATTACKS) >= 30
    assert len({a[0] for a in ATTACKS}) == len(ATTACKS)


@pytest.mark.parametrize(("name", "query", "expected"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_refused(
    target: Target,
    planted: Planted,
    name: str,
    query: str,
    expected: type[GeomstoreError] | tuple[type[GeomstoreError], ...],
) -> None:
    before = fingerprint(target)
    sql = _fill(query, planted, target)
    started = time.monotonic()
    with pytest.raises(expected) as info:
        res = target.store.sql(sql, timeout=1.0)
        assert SECRET not in str(res.table.to_pylist())  # shown if the query ran at all
    elapsed = time.monotonic() - started
    msg = str(info.value)
    assert SECRET not in msg
    assert "\n" not in msg and "AS q LIMIT" not in msg, msg
    assert isinstance(info.value, ValueError | TimeoutError)
    assert elapsed < 15, f"{name} took {elapsed:.1f} s"
    assert fingerprint(target) == before
    assert not any(planted.out.iterdir()), list(planted.out.iterdir())
    assert planted.txt.read_text() == f"{SECRET}\n"


def test_refusals_say_which_rule(target: Target, planted: Planted) -> None:
    def reason(q: str) -> str:
        with pytest.raises(SQLRefusedError) as info:
            target.store.sql(_fill(q, planted, target))
        return info.value.reason

    assert reason("SELECT * FROM read_text('{txt}')") == "function"
    assert reason("SELECT * FROM '{txt}'") == "table"
    assert reason("SELECT 1; SELECT 2") == "multiple"
    assert reason("SET threads = 64") in ("statement", "parse")
    assert reason("SELECT " + "1 + " * 60_000 + "1") == "size"
    assert reason("SELECT " + "abs(" * 900 + "1" + ")" * 900) == "size"
    # refusals are still ReadOnlyQueryError (the old class) and ValueError
    with pytest.raises(ReadOnlyQueryError):
        target.store.sql("DELETE FROM regions")


def test_the_connection_is_locked_below_the_rules(target: Target, planted: Planted) -> None:
    """Even SQL that skips the sandbox (the trusted reader) cannot read files or reconfigure."""
    con = target.store.reader()
    with pytest.raises(duckdb.Error) as info:
        con.execute(f"SELECT * FROM read_text('{planted.txt}')").fetchall()
    assert SECRET not in str(info.value)
    with pytest.raises(duckdb.Error):
        con.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.Error):
        con.execute("SET memory_limit = '100GB'")
    # sqlite_scan is the exception: the sqlite extension opens files itself, past these
    # settings, so only the sandbox's rules stop it (see the sqlite_* attacks)
    threads = con.execute("SELECT current_setting('threads')").fetchone()
    assert threads is not None and 1 <= int(threads[0]) <= 4


LEGIT = [
    ("count", "SELECT count(*) AS n FROM regions"),
    (
        "join",
        "SELECT p.partition_id, count(*) AS n FROM partitions p "
        "JOIN regions r USING (partition_id) GROUP BY 1",
    ),
    ("spatial-area", "SELECT sum(ST_Area(geometry)) AS a FROM regions"),
    (
        "spatial-predicates",
        "SELECT count(*) AS n FROM regions WHERE ST_Intersects(geometry, ST_Point(0.1, 0.2)) "
        "AND ST_DWithin(geometry, ST_Point(0, 0), 5)",
    ),
    ("view", "SELECT model, checkpoint, step, n_regions FROM gs_partitions"),
    ("macro", "SELECT n_neurons FROM gs_lc((SELECT min(partition_id) FROM partitions), 0, 0, 0.2)"),
    ("range", "SELECT sum(x) AS s FROM range(10) t(x)"),
    ("generate_series", "SELECT count(*) AS n FROM generate_series(1, 5)"),
    ("unnest", "SELECT unnest([1, 2, 3]) AS v"),
    ("cte", "WITH r AS (SELECT area FROM regions) SELECT max(area) AS m FROM r"),
    (
        "recursive-cte",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) "
        "SELECT sum(n) AS s FROM r",
    ),
    ("window", "SELECT region_id, rank() OVER (ORDER BY area DESC) AS k FROM regions"),
    ("points", "SELECT count(*) AS n FROM points JOIN datasets USING (dataset_id)"),
    ("qualified", "SELECT count(*) AS n FROM gs.regions"),
    ("describe", "DESCRIBE regions"),
    ("lambda", "SELECT list_transform([1, 2], x -> x * 2) AS l"),
    ("case-like", "SELECT CASE WHEN 'abc' LIKE 'a%' THEN 1 ELSE 0 END AS c"),
    ("jobs", "SELECT count(*) AS n FROM jobs"),
]


@pytest.mark.parametrize(("name", "query"), LEGIT, ids=[q[0] for q in LEGIT])
def test_legitimate_query_runs(target: Target, name: str, query: str) -> None:
    res = target.store.sql(query)
    assert res.table.num_rows >= 1
    assert not res.truncated


def test_legitimate_answers_are_exact(target: Target) -> None:
    s = target.store
    area = s.sql("SELECT sum(ST_Area(geometry)) AS a FROM regions").table.to_pylist()[0]["a"]
    assert abs(area - 4.0) < 1e-9
    got = s.sql("SELECT sum(x) AS s FROM range(?) t(x)", [10]).table.to_pylist()
    assert got == [{"s": 45}]
    named = s.sql("SELECT $a::INTEGER + $b::INTEGER AS v", {"a": 2, "b": 3}).table.to_pylist()
    assert named == [{"v": 5}]
    n = s.sql("SELECT count(*) AS n FROM regions WHERE partition_id = ?", [target.pid]).table
    assert n.column("n")[0].as_py() == s.partitions().column("n_regions")[0].as_py()


def test_row_cap_reports_truncated(target: Target) -> None:
    res = target.store.sql("SELECT * FROM range(1000000000000) t(x)", max_rows=7)
    assert res.table.num_rows == 7 and res.truncated
    exact = target.store.sql("SELECT * FROM range(7) t(x)", max_rows=7)
    assert exact.table.num_rows == 7 and not exact.truncated
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        old = target.store.sql("SELECT * FROM range(10) t(x)", limit=3)
    assert old.table.num_rows == 3 and old.truncated
    assert any(issubclass(x.category, DeprecationWarning) for x in w)


def test_errors_are_one_line_about_the_users_query(target: Target) -> None:
    cases = {
        "SELECT * FROM nosuch": "no table or view named 'nosuch'",
        "SELECT nosuch_column FROM regions": "nosuch_column",
        "SELEC 1": "cannot parse the query",
        "SELECT 'a'::INTEGER": "Could not convert",
        "SELECT nosuchfn(1)": "no function named 'nosuchfn'",
        "SELECT ?": "",
    }
    for query, expect in cases.items():
        with pytest.raises(SQLError) as info:
            target.store.sql(query)
        msg = str(info.value)
        assert expect in msg, (query, msg)
        assert "\n" not in msg and "LIMIT" not in msg and "LINE" not in msg, msg
    with pytest.raises(SQLError, match="max_rows"):
        target.store.sql("SELECT 1", max_rows=-1)
    with pytest.raises(SQLError, match="timeout"):
        target.store.sql("SELECT 1", timeout=0)


def test_timeout_stops_one_query_while_others_go_on(target: Target) -> None:
    errors: list[BaseException] = []
    answers: list[int] = []

    def slow() -> None:
        try:
            target.store.sql("SELECT count(*) FROM range(1000000000000)", timeout=1.0)
        except BaseException as exc:
            errors.append(exc)

    def quick() -> None:
        for _ in range(10):
            res = target.store.sql("SELECT count(*) AS n FROM regions", timeout=10)
            answers.append(res.table.column("n")[0].as_py())

    threads = [threading.Thread(target=slow)] + [threading.Thread(target=quick) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 1 and isinstance(errors[0], QueryTimeoutError)
    assert errors[0].timeout == 1.0
    assert len(answers) == 30 and len(set(answers)) == 1
    # the store still answers after a timeout, on the same thread
    assert target.store.sql("SELECT 1 AS one").table.to_pylist() == [{"one": 1}]


def test_store_still_writes_and_exports_after_reads(target: Target, tmp_path: Path) -> None:
    """Hardening the read path leaves the writer working (a .duckdb store shares one instance)."""
    target.store.sql("SELECT count(*) FROM regions")
    part = geomstore.partition(mlp((6,), out=2, seed=3), BOX, device="cpu")
    pid = target.store.add(part, model="later", checkpoint="c", step=1)
    assert pid in target.store.partitions(model="later").column("partition_id").to_pylist()
    if target.kind == "duckdb":
        files = target.store.export(tmp_path / "export")
        back = pq.read_table(tmp_path / "export" / "regions.parquet")
        assert len(files) >= 7 and back.num_rows > 0


def test_cli_sql_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with geomstore.open(store) as s:
        s.add(geomstore.partition(mlp((4,)), BOX, device="cpu"), model="m", checkpoint="c")
    for query, expect in [
        ("select * from nosuch", "Error: no table or view named 'nosuch'"),
        ("select * from read_text('/etc/hostname')", "Error: the table function read_text()"),
        ("select count(*) from range(1000000000000)", "Error: the query ran longer than"),
    ]:
        res = subprocess.run(
            [sys.executable, "-m", "geomstore", "sql", str(store), query, "--timeout", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 1, res
        assert res.stderr.startswith(expect), res.stderr
        assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
