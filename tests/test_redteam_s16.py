"""Red team of the query service and its SQL sandbox (session 16).

A hostile user of ``/api/sql`` and the rest of the HTTP API, against a real
``geomstore serve`` on 127.0.0.1 over a real store. Secrets are planted where an attack
would look for them: an environment variable of the server process, a file beside the
store and a CSV file inside the store's own data path (which DuckDB itself may read, so
only the sandbox's rules stand between it and a query).

Attacks that are refused are kept as regression tests: each asserts a clear 4xx JSON
answer and that no secret (nor the store's path) comes back. Section 3 holds the attacks
that worked when the red team wrote them (self-named CTEs reading system views and a
PostgreSQL catalog's password, matchers and distances that run for hours in one call,
answers written past the timeout, a quadratic error scrubber, DNS rebinding, answers of
500), each fixed since.
Every wait is bounded in count and time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path

import httpx
import pytest

import geomstore
from geomstore.errors import SQLError, SQLRefusedError
from tests.servers import Server, make_store, serve

ENV_SECRET = "GS-REDTEAM-ENV-SECRET-9b1f27"
FILE_SECRET = "GS-REDTEAM-FILE-SECRET-44ac0e"
DATA_SECRET = "GS-REDTEAM-DATA-SECRET-d07e31"
PG_SECRET = "GS-REDTEAM-PG-PASSWORD-6c2a"
RO = "ro-token-" + "r" * 24
RW = "rw-token-" + "w" * 24
TIMEOUT = 1.0  # the servers' --timeout (seconds)
SECRETS = (ENV_SECRET, FILE_SECRET, DATA_SECRET)


@dataclass(frozen=True)
class Planted:
    """The store, and where the secrets lie."""

    store: Path
    outside: Path  # a text file beside the store
    inside: Path  # a CSV file inside the store's data path (DuckDB may read it)
    out: Path  # a folder no query may write into


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    root = tmp_path_factory.mktemp("redteam")
    store = Path(make_store(root / "store"))
    outside = root / "secret.txt"
    outside.write_text(f"{FILE_SECRET}\n")
    inside = store / "data" / "secret.csv"
    inside.parent.mkdir(exist_ok=True)
    inside.write_text(f"name,value\nkey,{DATA_SECRET}\n")
    out = root / "out"
    out.mkdir()
    return Planted(store=store, outside=outside, inside=inside, out=out)


@pytest.fixture(scope="module")
def server(planted: Planted) -> Iterator[Server]:
    """A server without tokens (the loopback default) that holds ENV_SECRET in its env."""
    log = planted.store.parent / "server.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEOMSTORE_TEST_SECRET", ENV_SECRET)  # Server copies os.environ
        with serve(str(planted.store), "--timeout", str(TIMEOUT), log=log) as srv:
            mp.delenv("GEOMSTORE_TEST_SECRET")
            yield srv


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _clean(resp: httpx.Response, planted: Planted) -> None:
    """No secret and no path of the store or its folder in the answer."""
    text = resp.content.decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in text, (secret, text[:300])
    assert str(planted.store.parent) not in text, text[:300]
    assert str(planted.store.parent.resolve()) not in text, text[:300]


def _refusal(resp: httpx.Response, planted: Planted) -> dict:
    """A clear 4xx JSON error (never a 500, never a traceback) without secrets."""
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    err = resp.json()["error"]
    assert err["status"] == resp.status_code and err["message"]
    assert "Traceback" not in resp.text and "\n" not in err["message"]
    _clean(resp, planted)
    return err


# 1. SQL attacks that are refused ------------------------------------------------------------
# {outside}, {inside}, {data}, {store}, {out} are filled from Planted; the secret variable
# is GEOMSTORE_TEST_SECRET.
REFUSED: list[tuple[str, str]] = [
    ("cte-wrapped-read_csv", "WITH t AS (SELECT * FROM read_csv('{inside}')) SELECT * FROM t"),
    ("data-path-quoted", "SELECT * FROM '{inside}'"),
    ("data-path-double-quoted", 'SELECT * FROM "{inside}"'),
    ("data-path-glob-scan", "SELECT * FROM '{data}/*.csv'"),
    ("data-path-file-url", "SELECT * FROM 'file://{inside}'"),
    ("from-first-read_text", "FROM read_text('{outside}')"),
    ("comment-in-call", "SELECT * FROM READ_TEXT /* x */ ('{outside}')"),
    ("quoted-function-name", "SELECT * FROM \"read_text\"('{outside}')"),
    ("qualified-table-function", "SELECT * FROM system.main.read_text('{outside}')"),
    ("read_blob-recursive", "SELECT * FROM read_blob('{store}/**')"),
    ("glob-store", "SELECT * FROM glob('{store}/**')"),
    ("parquet_scan-data", "SELECT * FROM parquet_scan('{data}/**/*.parquet')"),
    ("read_parquet-list", "SELECT * FROM read_parquet(['{data}/x.parquet'])"),
    ("lateral-read_text", "SELECT * FROM range(1) r, LATERAL read_text('{outside}')"),
    (
        "macro-arg-subquery",
        "SELECT * FROM gs_lc((SELECT content FROM read_text('{outside}')), 0, 0, 1)",
    ),
    ("getenv", "SELECT getenv('GEOMSTORE_TEST_SECRET')"),
    ("getenv-quoted", "SELECT \"GETENV\"('GEOMSTORE_TEST_SECRET')"),
    ("getenv-method", "SELECT ('GEOMSTORE_TEST_SECRET').getenv()"),
    ("getenv-qualified", "SELECT system.main.getenv('GEOMSTORE_TEST_SECRET')"),
    ("getenv-in-lambda", "SELECT list_transform(['GEOMSTORE_TEST_SECRET'], x -> getenv(x))"),
    ("getenv-in-replace", "SELECT * REPLACE (getenv('GEOMSTORE_TEST_SECRET') AS name) FROM models"),
    ("getenv-in-columns", "SELECT COLUMNS(c -> getenv('GEOMSTORE_TEST_SECRET') <> '') FROM models"),
    ("getenv-in-qualify", "SELECT 1 QUALIFY getenv('GEOMSTORE_TEST_SECRET') IS NOT NULL"),
    ("getenv-in-at-clause", "SELECT * FROM regions AT (VERSION => length(getenv('X')))"),
    ("getvariable", "SELECT getvariable('x')"),
    ("current_setting", "SELECT current_setting('allowed_directories')"),
    ("duckdb_settings", "SELECT * FROM duckdb_settings()"),
    ("duckdb_secrets", "SELECT * FROM duckdb_secrets()"),
    ("duckdb_extensions", "SELECT * FROM duckdb_extensions()"),
    ("which_secret", "SELECT which_secret('s3://b/x', 's3')"),
    ("pg_catalog-settings", "SELECT * FROM pg_catalog.pg_settings"),
    ("information_schema", "SELECT * FROM information_schema.tables"),
    ("system-view-qualified", "SELECT * FROM system.main.duckdb_databases"),
    ("ducklake-metadata", "SELECT * FROM __ducklake_metadata_gs.main.ducklake_data_file"),
    ("two-statements", "SELECT 1; SELECT getenv('GEOMSTORE_TEST_SECRET')"),
    ("comment-hides-semicolon", "SELECT 1 /* ; */; PRAGMA version"),
    ("create-macro", "CREATE MACRO m() AS getenv('GEOMSTORE_TEST_SECRET')"),
    ("create-temp-macro", "CREATE TEMP MACRO m() AS TABLE SELECT * FROM read_text('{outside}')"),
    ("prepare", "PREPARE p AS SELECT * FROM read_text('{outside}')"),
    ("execute", "EXECUTE p"),
    ("export-database", "EXPORT DATABASE '{out}/dump'"),
    ("copy-to", "COPY (SELECT 1) TO '{out}/x.csv'"),
    ("install-from", "INSTALL httpfs FROM 'http://127.0.0.1:1'"),
    ("load-file", "LOAD '{out}/evil.duckdb_extension'"),
    ("set-unlock", "SET lock_configuration = false"),
    ("reset-all", "RESET ALL"),
    ("call-pragma", "CALL pragma_version()"),
    ("attach-memory", "ATTACH ':memory:' AS m"),
    ("use-other", "USE memory"),
    ("begin", "BEGIN TRANSACTION"),
    ("vacuum", "VACUUM"),
    ("summarize-file", "SUMMARIZE SELECT * FROM read_text('{outside}')"),
    ("describe-getenv", "DESCRIBE SELECT getenv('GEOMSTORE_TEST_SECRET')"),
    ("pivot-file", "PIVOT (SELECT * FROM read_csv('{inside}')) ON name USING first(value)"),
    ("unpivot-subquery", "SELECT * FROM (UNPIVOT (SELECT 1 AS a) ON a INTO NAME k VALUE v)"),
    ("show-databases", "SHOW DATABASES"),
    ("query-function", "SELECT * FROM query('SELECT 1')"),
    ("fullwidth-name", "SELECT * FROM \uff52ead_text('{outside}')"),
    ("zero-width-name", "SELECT * FROM read_text\u200b('{outside}')"),
    ("traversal-table-name", 'SELECT * FROM "regions/../../secret.txt"'),
    ("cte-path-name", 'WITH "{outside}" AS (SELECT 1) SELECT * FROM "{outside}"'),
]


def _fill(query: str, p: Planted) -> str:
    return query.format(
        outside=p.outside, inside=p.inside, data=p.inside.parent, store=p.store, out=p.out
    )


@pytest.mark.parametrize(("name", "query"), REFUSED, ids=[a[0] for a in REFUSED])
def test_sql_attack_is_refused(http: httpx.Client, planted: Planted, name: str, query: str) -> None:
    sql = _fill(query, planted)
    for resp in (
        http.post("/api/sql", json={"sql": sql}),
        http.get("/api/sql", params={"sql": sql}),
    ):
        err = _refusal(resp, planted)
        assert err["type"] in ("SQLRefusedError", "SQLError"), err
    assert not any(planted.out.iterdir())  # nothing was written


RUNAWAY = [
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
    "SELECT count(*) FROM range(1000000000000)",
    "SELECT count(*) FROM regions a, regions b, regions c, regions d, range(100000000) e",
    "SELECT length(string_agg(repeat('x', 1000), '')) FROM range(1000000000)",
]


@pytest.mark.parametrize("query", RUNAWAY, ids=["recursive", "range", "cross-join", "agg"])
def test_runaway_queries_stop_at_the_servers_timeout(
    http: httpx.Client, planted: Planted, query: str
) -> None:
    t0 = time.monotonic()
    # a client cannot raise its own limit past the server's
    err = _refusal(http.post("/api/sql", json={"sql": query, "timeout": 1e9}), planted)
    assert err["type"] in ("QueryTimeoutError", "SQLError"), err
    assert time.monotonic() - t0 < TIMEOUT + 10


def test_parameters_stay_values(http: httpx.Client, planted: Planted) -> None:
    evil = "x'); SELECT getenv('GEOMSTORE_TEST_SECRET'); --"
    r = http.post("/api/sql", json={"sql": "SELECT ? AS v", "params": [evil]})
    assert r.status_code == 200 and r.json()["rows"] == [{"v": evil}]
    r = http.post("/api/sql", json={"sql": "SELECT $a AS v", "params": {"a": "'/etc/passwd'"}})
    assert r.status_code == 200 and r.json()["rows"] == [{"v": "'/etc/passwd'"}]
    _clean(r, planted)


def test_service_endpoints_never_show_the_environment_or_paths(
    http: httpx.Client, planted: Planted
) -> None:
    for path in ("/healthz", "/metrics", "/openapi.json", "/docs", "/api/models", "/api/jobs"):
        r = http.get(path)
        assert r.status_code == 200, (path, r.text[:200])
        _clean(r, planted)
    for name in ("GEOMSTORE_TEST_SECRET", "PATH", "HOME"):
        r = http.get(f"/api/partitions/{name}/regions")
        _refusal(r, planted)


# 2. HTTP inputs that are refused ------------------------------------------------------------
def test_malformed_bodies_answer_4xx(http: httpx.Client, planted: Planted) -> None:
    raw = {"content-type": "application/json"}
    cases: list[tuple[str, dict[str, str]]] = [
        ('{"sql": "SELECT 1", "params": ' + "[" * 20_000 + "]" * 20_000 + "}", raw),
        ('{"sql": "SELECT 1", "max_rows": 1' + "0" * 5000 + "}", raw),
        ('{"sql": "SELECT 1", "timeout": NaN}', raw),
        ('{"sql": "SELECT 1", "timeout": Infinity}', raw),
        ('{"sql": ["SELECT 1"]}', raw),
        ('{"sql": "SELECT 1", "extra": 1}', raw),
        ("[]", raw),
        ("\ufeff{}", raw),
        ('{"sql": "SELECT 1"}', {"content-type": "text/plain"}),
        ("sql=SELECT+1", {"content-type": "application/x-www-form-urlencoded"}),
    ]
    for body, headers in cases:
        r = http.post("/api/sql", content=body.encode(), headers=headers)
        _refusal(r, planted)


def test_format_and_path_parameters_cannot_inject(http: httpx.Client, planted: Planted) -> None:
    r = http.get("/api/models", params={"format": "json\r\nX-Injected: 1"})
    _refusal(r, planted)
    assert "x-injected" not in r.headers
    for path in (
        "/api/partitions/..%2F..%2Fsecret.txt/regions",
        "/api/datasets/..%2F..%2Fsecret.txt/points?slice=box",
        "/api/partitions/%27%20OR%201%3D1--/regions",
        "/api/checkpoints?model=%27%20OR%201%3D1--",
        "/api/partitions?checkpoint=%27)%20OR%20(1%3D1",
        "/api/jobs/%27%20OR%201%3D1--",
    ):
        _refusal(http.get(path), planted)


def _raw_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``path`` exactly as given (httpx would normalise ``..``)."""
    host, port = url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_static_files_do_not_traverse(server: Server) -> None:
    for path in (
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/static/swagger/../../app.py",
        "/static/../api/models",
        "/static/%2e%2e/%2e%2e/store/sandbox.py",
    ):
        status, body = _raw_get(server.url, path)
        assert status == 404, (path, status, body[:200])
        assert b"create_app" not in body and b"def " not in body and b'"rows"' not in body


def test_tokens_cannot_be_bypassed(planted: Planted, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{RO} ro\n{RW} rw\n")
    origin = "http://viewer.example"
    args = ("--token-file", str(tokens), "--cors-origin", origin, "--timeout", str(TIMEOUT))
    with serve(str(planted.store), *args) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        attempts: list[tuple[str, str, dict[str, str], int]] = [
            ("GET", "/api/models", {}, 401),
            ("HEAD", "/api/models", {}, 401),
            ("GET", "/metrics", {}, 401),
            ("GET", "/api/models", {"Authorization": f"Basic {RO}"}, 401),
            ("GET", "/api/models", {"Authorization": f"Bearer {RO[:-1]}"}, 401),
            ("GET", "/api/models", {"Authorization": f"Bearer {RO}x"}, 401),
            ("GET", "/api/models", {"Authorization": f"Bearer {RO} {RO}"}, 401),
            ("GET", "/api/models", {"Authorization": "Bearer"}, 401),
            ("GET", f"/api/models?token={RO}", {}, 401),
            ("GET", f"/api/models?access_token={RO}", {}, 401),
            ("GET", "/api/models", {"Cookie": f"token={RO}"}, 401),
            ("POST", "/api/jobs", {"Authorization": f"Bearer {RO}"}, 403),
            ("POST", "/api/jobs/", {"Authorization": f"Bearer {RO}"}, 403),
            ("PUT", "/api/jobs", {"Authorization": f"Bearer {RO}"}, 403),
            ("OPTIONS", "/api/sql", {"Origin": origin}, 401),  # not a preflight
            (
                "OPTIONS",
                "/api/sql",
                {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
                401,
            ),
        ]
        for method, path, headers, status in attempts:
            r = c.request(method, path, headers=headers, json={"sql": "SELECT 1"})
            assert r.status_code == status, (method, path, headers, r.status_code, r.text[:200])
            assert b'"rows"' not in r.content
        # a preflight from the configured origin runs no endpoint
        pre = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        r = c.request("OPTIONS", "/api/sql", headers=pre, content=b'{"sql": "SELECT 1"}')
        assert r.status_code == 200 and b'"rows"' not in r.content
        # public paths tell an anonymous caller nothing about the store
        assert c.get("/healthz", headers={"Authorization": "Bearer nope"}).json() == {
            "status": "ok"
        }
        status, body = _raw_get(srv.url, "/static/../api/models")
        assert status == 404 and b'"rows"' not in body
        ok = c.get("/api/models", headers={"Authorization": f"bearer {RO}"})
        assert ok.status_code == 200


def test_body_limit_holds_without_content_length(http: httpx.Client, planted: Planted) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"sql": "SELECT \''
        for _ in range(12):  # 12 MB, over the default --max-body of 8 MiB
            yield b"x" * 2**20
        yield b"'\"}"

    r = http.post("/api/sql", content=chunks(), headers={"Content-Type": "application/json"})
    assert _refusal(r, planted)["status"] == 413


# 3. defects the red team found, fixed (each test failed before its fix) -----------------------
SHADOW = "WITH {v} AS (SELECT * FROM {v}) SELECT * FROM {v}"


def test_self_named_cte_cannot_reach_system_views(http: httpx.Client, planted: Planted) -> None:
    for view in ("duckdb_databases", "pragma_database_list", "pg_settings", "sqlite_master"):
        r = http.post("/api/sql", json={"sql": SHADOW.format(v=view)})
        _refusal(r, planted)
    later = "WITH a AS (SELECT * FROM pg_settings), pg_settings AS (SELECT 1) SELECT * FROM a"
    _refusal(http.post("/api/sql", json={"sql": later}), planted)


def test_self_named_cte_cannot_read_the_catalog_password(tmp_path: Path) -> None:
    from tests.pgserver import postgres_server

    with postgres_server(tmp_path / "pg") as dsn:
        target = f"postgres:{dsn} password={PG_SECRET}"  # trust auth: the password is unused
        geomstore.open(target, data_path=tmp_path / "data").close()
        with geomstore.open(target, data_path=tmp_path / "data", read_only=True) as st:
            for view in ("duckdb_databases", "pg_settings"):
                try:
                    res = st.sql(SHADOW.format(v=view))
                except (SQLRefusedError, SQLError) as exc:
                    assert PG_SECRET not in str(exc)
                else:
                    shown = json.dumps(res.table.to_pylist(), default=str)
                    assert PG_SECRET not in shown, shown[:300]


def test_python_replacement_scans_are_off_on_the_read_cursors(planted: Planted) -> None:
    with geomstore.open(planted.store, read_only=True) as st:
        st.sql("SELECT 1")  # the read path and its cursors exist
        row = st.reader().execute("SELECT current_setting('python_enable_replacements')")
        assert row.fetchone() == (False,)


SLOW_CALLS = [
    # one uninterruptible call each, seconds to hours on a string built in the query
    "SELECT levenshtein(repeat('a', 50000), repeat('b', 50000)) AS d",
    "SELECT damerau_levenshtein(repeat('a', 50000), repeat('b', 50000)) AS d",
    "SELECT repeat('a', 100000) LIKE '%a_%b' AS m",  # 9.5 s before, quadratic
    "SELECT repeat('a', 60) LIKE '%a_%a_%a_%a_%a_%a_%a_%a_%a_%a_%b' AS m",  # exponential
    "SELECT repeat('a', 60) GLOB '*a*a*a*a*a*a*a*a*a*a*b' AS m",
    "SELECT repeat('a', 60) ILIKE '%a%a%a%a%a%a%a%a%a%a%b' AS m",
    "SELECT repeat('a', 60) NOT ILIKE '%a%a%a%a%a%a%a%a%a%a%b' AS m",
    "SELECT repeat('a', 60) LIKE '%a%a%a%a%a%a%a%a%a%a%b' ESCAPE '!' AS m",
    "SELECT repeat('a', 60) ILIKE '%a%a%a%a%a%a%a%a%a%a%b' ESCAPE '!' AS m",
    "SELECT repeat('a', 60) LIKE '%' || repeat('a_%', 10) || 'b' AS m",  # computed pattern
    "SELECT \"~~*\"(repeat('a', 60), '%a%a%a%a%a%a%a%a%a%a%b') AS m",
    "SELECT name FROM models WHERE repeat(name, 100000) LIKE name",  # a column as pattern
]


@pytest.mark.parametrize("sql", SLOW_CALLS)
def test_calls_a_timeout_cannot_stop_are_refused(
    http: httpx.Client, planted: Planted, sql: str
) -> None:
    t0 = time.monotonic()
    r = http.post("/api/sql", json={"sql": sql, "timeout": 0.2})
    assert time.monotonic() - t0 < 5.0
    err = _refusal(r, planted)
    assert err["type"] == "SQLRefusedError" and "timeout cannot stop" in err["message"], err


def test_slow_patterns_as_parameters_are_refused_and_fine_ones_run(
    http: httpx.Client, planted: Planted
) -> None:
    sql = "SELECT repeat('a', 60) LIKE $1 AS m"
    r = http.post("/api/sql", json={"sql": sql, "params": ["%a_%a_%a_%a_%a_%b"]})
    assert "timeout cannot stop" in _refusal(r, planted)["message"]
    for pattern, want in [("a%", True), ("%a_", True), ("%b%", False), ("%a%a%a%a%b", False)]:
        r = http.post("/api/sql", json={"sql": sql, "params": [pattern]})
        assert r.status_code == 200 and r.json()["rows"] == [{"m": want}], (pattern, r.text)
    fine = (
        "SELECT 'moons-mlp' LIKE 'moons%' AS a, 'moons-mlp' ILIKE '%MLP' AS b, "
        "'moons-mlp' GLOB 'moons*' AS c, 'moons-mlp' LIKE 'moon_-%' AS d, "
        "'moons-mlp' NOT LIKE '%x%y%z%' AS e, 'a_b' LIKE 'a!_b' ESCAPE '!' AS f, "
        "jaro_winkler_similarity('moons', 'moon') > 0.9 AS g"
    )
    r = http.post("/api/sql", json={"sql": fine})
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [dict.fromkeys("abcdefg", True)]


def test_encoding_a_result_is_bounded_by_the_timeout(http: httpx.Client, planted: Planted) -> None:
    sql = "SELECT range(200) AS r FROM range(100000)"  # 20 M list cells, fast in DuckDB
    t0 = time.monotonic()
    r = http.post("/api/sql", json={"sql": sql})
    took = time.monotonic() - t0
    assert took < TIMEOUT + 1.0, (r.status_code, took, len(r.content))


def test_error_scrubbing_is_linear(http: httpx.Client, server: Server, planted: Planted) -> None:
    name = "a." * 25_000  # 50 kB: ~4 s in scrub, quadratic
    seen: dict[str, float] = {}

    def probe() -> None:
        time.sleep(0.3)
        t0 = time.monotonic()
        httpx.get(server.url + "/healthz", timeout=60)
        seen["healthz"] = time.monotonic() - t0

    thread = threading.Thread(target=probe)
    thread.start()
    t0 = time.monotonic()
    r = http.post("/api/lc", json={"model": name, "points": [[0, 0]], "radius": 0.1})
    took = time.monotonic() - t0
    thread.join(60)
    assert r.status_code == 404, r.text[:200]
    assert took < 1.0, took
    assert seen.get("healthz", 99.0) < 1.0, seen


SERVER_ERRORS: list[tuple[str, str, object]] = [
    # pyarrow.ArrowInvalid (nesting over 64) escapes ReadPath.sql, which catches duckdb.Error
    ("nested-list", "/api/sql", {"sql": "SELECT " + "[" * 70 + "1" + "]" * 70 + " AS a"}),
    (
        "nested-param",
        "/api/sql",
        '{"sql": "SELECT ? AS a", "params": [' + "[" * 70 + "1" + "]" * 71 + "}",
    ),
    # shapely's GEOSException is not among formats._UNWRITABLE
    ("bad-wkb-json", "/api/sql", {"sql": "SELECT 'x'::BLOB AS geometry"}),
    ("bad-wkb-geojson", "/api/sql?format=geojson", {"sql": "SELECT 'abc'::BLOB AS geometry"}),
    # a lone surrogate is valid JSON; DuckDB cannot encode it (TypeError / UnicodeEncodeError)
    ("surrogate-sql", "/api/sql", '{"sql": "SELECT \'\\ud800\'"}'),
    ("surrogate-param", "/api/sql", '{"sql": "SELECT ?", "params": ["\\ud800"]}'),
    ("surrogate-model", "/api/lc", '{"model": "\\ud800", "points": [[0, 0]], "radius": 0.1}'),
]


@pytest.mark.parametrize(("name", "path", "body"), SERVER_ERRORS, ids=[c[0] for c in SERVER_ERRORS])
def test_odd_requests_answer_4xx_not_500(
    http: httpx.Client, planted: Planted, name: str, path: str, body: object
) -> None:
    if isinstance(body, str):
        r = http.post(path, content=body.encode(), headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    _refusal(r, planted)


def test_foreign_host_header_is_refused_without_tokens(server: Server) -> None:
    status, body = _raw_get(server.url, "/api/models", {"Host": "evil.example:8765"})
    assert 400 <= status < 500, (status, body[:200])
    assert b'"rows"' not in body
    status, body = _raw_get(server.url, "/api/models", {"Host": "127.0.0.1"})
    assert status == 200


def test_a_column_named_twice_is_answered_once(http: httpx.Client, planted: Planted) -> None:
    pid = http.get("/api/partitions").json()["rows"][0]["partition_id"]
    r = http.get(f"/api/partitions/{pid}/regions?columns=geometry,geometry&format=geojson")
    assert r.status_code == 200, r.text[:300]
    features = r.json()["features"]
    assert features and all(f["geometry"]["type"] == "Polygon" for f in features)
    r = http.get(f"/api/partitions/{pid}/regions?columns=region_id,region_id&format=json")
    assert r.status_code == 200 and r.json()["columns"] == ["region_id"], r.text[:300]


def test_users_sql_reads_jobs_without_tokens_or_paths(tmp_path: Path) -> None:
    import torch

    from geomstore.jobs import submit
    from geomstore.loading import ModelSpec
    from tests.nets import BOX, mlp

    secret_dir = tmp_path / "GS-REDTEAM-UPLOAD-DIR-51e0"
    secret_dir.mkdir()
    f = secret_dir / "step-3.pt2"
    torch.export.save(torch.export.export(mlp((8,), 2), (torch.zeros(1, 2),)), str(f))
    with geomstore.open(tmp_path / "store") as st:
        job = submit(st, ModelSpec(str(f)), BOX, model="m")
        st.con.execute(
            "UPDATE jobs SET token = 'GS-REDTEAM-CLAIM-TOKEN-7f' WHERE job_id = ?", [job]
        )
        st.con.execute("INSERT INTO job_heartbeats VALUES ('GS-REDTEAM-CLAIM-TOKEN-7f', now())")
        for sql in (
            "SELECT * FROM jobs",
            "SELECT * FROM main.jobs",
            "SELECT * FROM job_heartbeats",
            "WITH jobs AS (SELECT * FROM jobs) SELECT * FROM jobs",
            "SELECT to_json(j) FROM jobs j",
        ):
            shown = json.dumps(st.sql(sql).table.to_pylist(), default=str)
            assert "CLAIM-TOKEN" not in shown and "UPLOAD-DIR" not in shown, (sql, shown[:300])
        assert st.sql("SELECT job_id, status FROM jobs").table.to_pylist() == [
            {"job_id": job, "status": "queued"}
        ]
        for sql in ("SELECT token FROM gs.jobs", "SELECT * FROM gs.main.jobs", 'FROM "GS".jobs'):
            with pytest.raises(SQLRefusedError, match="without the catalog name"):
                st.sql(sql)
        # the trusted read path (job_table, the worker) still sees the whole table
        assert st.reader().execute("SELECT token FROM jobs").fetchone() == (
            "GS-REDTEAM-CLAIM-TOKEN-7f",
        )


CTE_SCOPES: list[tuple[str, str | None]] = [
    # (query, None: it runs | the start of the refusal's message)
    ("WITH RECURSIVE pg_settings AS (SELECT * FROM pg_settings) SELECT 1", "the common table"),
    ("WITH duckdb_tables AS MATERIALIZED (SELECT 1) SELECT 1", "the common table"),
    ("WITH a AS (SELECT * FROM b), b AS (SELECT 1 AS x) SELECT * FROM a", "no table"),
    ("WITH a AS (SELECT * FROM a) SELECT * FROM a", "no table"),
    (
        "WITH r AS (SELECT 1 AS x) SELECT * FROM r WHERE x IN "
        "(WITH s AS (SELECT * FROM secrets) SELECT * FROM s)",
        "no table",
    ),
    ("WITH a AS (SELECT 1 AS x), b AS (SELECT x + 1 AS y FROM a) SELECT y FROM b", None),
    (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 4) "
        "SELECT sum(n) AS s FROM r",
        None,
    ),
    (
        "WITH t AS (SELECT region_id FROM regions) "
        "SELECT count(*) AS n FROM t WHERE EXISTS (WITH u AS (SELECT * FROM t) SELECT * FROM u)",
        None,
    ),
    ("WITH regions AS (SELECT 1 AS region_id) SELECT * FROM regions", None),
]


@pytest.mark.parametrize(("sql", "refusal"), CTE_SCOPES)
def test_ctes_are_in_scope_where_duckdb_scopes_them(
    planted: Planted, sql: str, refusal: str | None
) -> None:
    with geomstore.open(planted.store, read_only=True) as st:
        if refusal is None:
            assert st.sql(sql).table.num_rows >= 1
        else:
            with pytest.raises((SQLRefusedError, SQLError), match=refusal):
                st.sql(sql)
