"""geomstore serve and the client: endpoints, formats, access, limits, errors, metrics.

One real server process over a real store answers most tests; answers are held equal to
the local store's (the same query functions, float64 exact).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from fastapi.testclient import TestClient

import geomstore
from geomstore import queries
from geomstore.errors import NotFoundError, SQLError, SQLRefusedError
from geomstore.service import ServiceConfig, create_app
from geomstore.service.auth import AccessError, load_tokens
from geomstore.service.formats import ARROW
from tests.servers import Server, make_store, serve

SECRET = "GEOMSTORE-PLANTED-SECRET-7f3a"
RO = "ro-token-" + "a" * 24
RW = "rw-token-" + "b" * 24


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("svc")
    (root / "secret.txt").write_text(SECRET)
    return make_store(root / "store")


@pytest.fixture(scope="module")
def server(store_path: str) -> Iterator[Server]:
    with serve(
        store_path,
        "--max-points",
        "500",
        "--max-samples",
        "5000",
        log=Path(store_path).parent / "server.log",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def local(store_path: str) -> Iterator[geomstore.Store]:
    with geomstore.open(store_path, read_only=True) as st:
        yield st


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[geomstore.client.Client]:
    with geomstore.connect(server.url) as c:
        yield c


def _arrow(resp: httpx.Response) -> pa.Table:
    assert resp.status_code == 200, resp.text
    return pa.ipc.open_stream(resp.content).read_all()


def _plain(t: pa.Table) -> pa.Table:
    return t.replace_schema_metadata(None)


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["status"] == status and err["message"]
    assert "Traceback" not in resp.text and "\n" not in err["message"]
    return err


# catalog and partition tables -------------------------------------------------------------
def test_catalog_endpoints_match_the_local_catalog(
    http: httpx.Client, local: geomstore.Store
) -> None:
    from geomstore.queries import catalog

    for path, expected in (
        ("/api/models", catalog.models(local)),
        ("/api/checkpoints?model=net", catalog.checkpoints(local, model="net")),
        ("/api/slices", catalog.slices(local)),
        (
            "/api/partitions?model=net&slice=box&checkpoint=step0&checkpoint=step200",
            catalog.partitions(local, model="net", slice="box", checkpoints=["step0", "step200"]),
        ),
    ):
        got = _arrow(http.get(path, headers={"Accept": ARROW}))
        assert _plain(got).equals(expected), path
    rows = http.get("/api/partitions", params={"model": "net"}).json()
    assert rows["num_rows"] == 3 and [r["step"] for r in rows["rows"]] == [0, 100, 200]
    err = _error(http.get("/api/partitions", params={"model": "nope"}), 404)
    assert err["type"] == "NotFoundError" and (err["kind"], err["name"]) == ("model", "nope")
    _error(http.get("/api/checkpoints", params={"model": "nope"}), 404)


def _pid(local: geomstore.Store, checkpoint: str = "step100") -> str:
    t = local.partitions(model="net", checkpoints=[checkpoint])
    return str(t.column("partition_id")[0].as_py())


def test_regions_in_every_format(http: httpx.Client, local: geomstore.Store) -> None:
    pid = _pid(local)
    part = local.load_partition(pid)
    url = f"/api/partitions/{pid}/regions"
    arrow = _arrow(http.get(url, headers={"Accept": ARROW}))
    assert arrow.num_rows == part.n_regions
    assert arrow.column("region_id").to_pylist() == part.regions.column("region_id").to_pylist()
    assert arrow.column("geometry").to_pylist() == part.regions.column("geometry").to_pylist()
    assert arrow.column("area").to_pylist() == part.regions.column("area").to_pylist()
    # ?format= beats Accept; parquet and csv carry the same rows
    pq_table = pq.read_table(
        io.BytesIO(http.get(url + "?format=parquet", headers={"Accept": ARROW}).content)
    )
    assert pq_table.column("slope_norm").to_pylist() == arrow.column("slope_norm").to_pylist()
    csv = http.get(url, params={"format": "csv", "columns": "region_id,label"})
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.strip().splitlines()
    assert lines[0] == "region_id,label" and len(lines) == part.n_regions + 1
    geo = http.get(url, params={"format": "geojson"}).json()
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == part.n_regions
    areas = [shapely.geometry.shape(f["geometry"]).area for f in geo["features"]]
    np.testing.assert_allclose(areas, arrow.column("area").to_numpy(), rtol=1e-12)
    js = http.get(url, params={"columns": "region_id,pattern_hash,A"}).json()
    assert js["columns"] == ["region_id", "pattern_hash", "A"]
    assert len(js["rows"][0]["pattern_hash"]) == 32 and len(js["rows"][0]["A"]) == 6
    # GeoJSON needs geometry; unknown formats and columns are 400 with the choices
    assert (
        "geometry"
        in _error(http.get(url, params={"format": "geojson", "columns": "region_id"}), 400)[
            "message"
        ]
    )
    assert "json, arrow" in _error(http.get(url, params={"format": "xml"}), 400)["message"]
    assert "columns:" in _error(http.get(url, params={"columns": "nope"}), 400)["message"]


def test_bbox_keeps_exactly_the_regions_meeting_the_box(
    http: httpx.Client, local: geomstore.Store
) -> None:
    pid = _pid(local)
    part = local.load_partition(pid)
    box = (-0.3, 0.1, 0.2, 0.45)
    got = _arrow(
        http.get(
            f"/api/partitions/{pid}/regions",
            params={"bbox": ",".join(map(str, box)), "format": "arrow"},
        )
    )
    polys = part.polygons()
    want = part.regions.column("region_id").to_numpy()[shapely.intersects(polys, shapely.box(*box))]
    assert 0 < got.num_rows < part.n_regions
    assert sorted(got.column("region_id").to_pylist()) == sorted(want.tolist())
    for table in ("edges", "boundary"):
        rows = http.get(f"/api/partitions/{pid}/{table}", params={"bbox": "-1,-1,1,1"}).json()
        assert rows["num_rows"] == getattr(part, table).num_rows
    _error(http.get(f"/api/partitions/{pid}/regions", params={"bbox": "1,2,3"}), 400)
    _error(http.get(f"/api/partitions/{pid}/regions", params={"bbox": "1,1,0,0"}), 400)
    err = _error(http.get("/api/partitions/0123456789abcdef0123/edges"), 404)
    assert err["kind"] == "partition"


# queries through the client equal the local query functions -------------------------------
def test_client_answers_equal_the_local_store(
    client: geomstore.client.Client, local: geomstore.Store
) -> None:
    u = np.array([[0.1, -0.2], [0.55, 0.3], [-0.9, 0.95]])
    sel = {"model": "net", "slice": "box"}
    assert client.partitions(model="net").equals(local.partitions(model="net"))
    assert client.sql("SELECT * FROM gs_partitions ORDER BY 1").table.equals(
        local.sql("SELECT * FROM gs_partitions ORDER BY 1").table
    )
    assert client.local_complexity(points=u, radius=0.15, **sel).equals(
        queries.local_complexity(local, points=u, radius=0.15, **sel)
    )
    t_remote, turns_remote = client.lc_trajectory(points="pts", radius=0.1, **sel)
    t_local, turns_local = queries.lc_trajectory(local, points="pts", radius=0.1, **sel)
    assert t_remote.equals(t_local) and turns_remote == turns_local
    assert client.partition_stats(model="net", checkpoints=["step0", "step200"]).equals(
        queries.partition_stats(local, model="net", checkpoints=["step0", "step200"])
    )
    opts = {"seed": 3, "offset": 0.01}
    remote = client.boundary_samples(n=50, **sel, **opts)
    here = queries.boundary_samples(local, n=50, **sel, **opts)
    assert remote.equals(here) and remote.num_rows >= 50
    b = local.load_partition(_pid(local, "step0")).boundary
    pair = (b.column("class_a")[0].as_py(), b.column("class_b")[0].as_py())
    one = {"checkpoints": ["step0"], "pair": pair, "seed": 1}
    assert client.boundary_samples(n=10, **sel, **one).equals(
        queries.boundary_samples(local, n=10, **sel, **one)
    )
    assert remote.column("x").combine_chunks().to_numpy_ndarray().shape == (remote.num_rows, 2)
    near = np.array([[b.column("u0_a")[0].as_py(), b.column("u1_a")[0].as_py()]])
    one = {"checkpoints": ["step0"], "near": near, "within": 0.2}
    assert client.boundary_samples(n=20, **sel, **one).equals(
        queries.boundary_samples(local, n=20, **sel, **one)
    )
    assert client.churn(points="pts", **sel).equals(queries.churn(local, points="pts", **sel))
    pid = _pid(local)
    a, b = client.load_partition(pid), local.load_partition(pid)
    for name in ("regions", "edges", "boundary"):
        assert getattr(a, name).equals(getattr(b, name)), name
    assert np.array_equal(a.states, b.states) and a.slice == b.slice
    assert a.model_summary == b.model_summary and a.settings == b.settings
    assert client.load_slice("box") == local.load_slice("box")


def test_compare_matches_the_local_store(
    client: geomstore.client.Client, local: geomstore.Store
) -> None:
    want = queries.agreement_over(local, model="net", slice="box")
    got = client.agreement_over(model="net", slice="box")
    assert got.equals(want) and got.num_rows == 2 * 4  # 2 pairs x (3 classes + total)
    assert got.column("hausdorff").null_count < got.num_rows


def test_region_at_a_point_has_pattern_affine_map_label_and_distances(
    client: geomstore.client.Client, local: geomstore.Store
) -> None:
    u = np.array([[0.1, -0.2], [0.5, 0.5]])
    ck = ["step0", "step100"]
    for affine in (False, True):  # the same arguments and columns as the local store
        got = queries.point_regions(client, model="net", points=u, checkpoints=ck, affine=affine)
        want = queries.point_regions(local, model="net", points=u, checkpoints=ck, affine=affine)
        assert got.equals(want)
    for row in got.to_pylist():
        part = local.load_partition(row["partition_id"])
        a, c = part.affine_maps()
        i = part.regions.column("region_id").to_pylist().index(row["region_id"])
        assert row["A"] == a[i].reshape(-1).tolist() and row["c"] == c[i].tolist()
        assert shapely.contains_xy(part.polygons()[i], *u[row["point_id"]])
        assert isinstance(row["pattern_hash"], bytes) and len(row["pattern_hash"]) == 16


def test_typed_errors_come_back_through_the_client(client: geomstore.client.Client) -> None:
    with pytest.raises(NotFoundError) as nf:
        client.partition_stats(model="nope")
    assert nf.value.kind == "model" and nf.value.name == "nope"
    with pytest.raises(SQLRefusedError):
        client.sql(f"SELECT * FROM read_text('{Path(__file__)}')")
    with pytest.raises(SQLError, match="nosuch_table"):
        client.sql("SELECT * FROM nosuch_table")


# SQL, limits and hostile input ------------------------------------------------------------
ATTACKS = [
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM read_csv('{secret}')",
    "SELECT * FROM '{secret}'",
    "SELECT * FROM glob('{root}/*')",
    "SELECT * FROM sqlite_scan('{root}/store/catalog.sqlite', 'ducklake_metadata')",
    "ATTACH '{root}/x.duckdb' AS x",
    "COPY (SELECT 1) TO '{root}/out.csv'",
    "INSTALL httpfs",
    "SET enable_external_access = true",
    "SELECT 1; SELECT * FROM read_text('{secret}')",
    "WITH x AS (DELETE FROM regions RETURNING *) SELECT * FROM x",
    "PRAGMA version",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_hostile_sql_is_refused_as_json_and_the_secret_never_returns(
    http: httpx.Client, store_path: str, attack: str
) -> None:
    root = Path(store_path).parent
    sql = attack.format(secret=root / "secret.txt", root=root)
    resp = http.post("/api/sql", json={"sql": sql})
    assert 400 <= resp.status_code < 500, resp.text
    assert SECRET not in resp.text and str(root) not in resp.text
    assert resp.json()["error"]["message"]
    assert http.get("/healthz").status_code == 200


def test_sql_row_cap_and_one_line_errors(http: httpx.Client) -> None:
    res = http.post("/api/sql", json={"sql": "SELECT * FROM range(50)", "max_rows": 7}).json()
    assert res["num_rows"] == 7 and res["truncated"] is True
    arrow = http.post(
        "/api/sql?format=arrow", json={"sql": "SELECT * FROM range(50)", "max_rows": 7}
    )
    assert arrow.headers["x-geomstore-truncated"] == "true"
    assert (
        pa.ipc.open_stream(arrow.content).read_all().schema.metadata[b"geomstore.truncated"]
        == b"true"
    )
    got = http.get("/api/sql", params={"sql": "SELECT * FROM range(50)", "max_rows": 5})
    assert got.json()["num_rows"] == 5 and got.json()["truncated"] is True
    err = _error(http.post("/api/sql", json={"sql": "SELECT * FROM nosuch"}), 400)
    assert "nosuch" in err["message"] and "LIMIT" not in err["message"]


def test_bad_requests_answer_4xx_json(http: httpx.Client, server: Server) -> None:
    _error(
        http.post("/api/sql", content=b"{not json", headers={"content-type": "application/json"}),
        400,
    )
    _error(http.post("/api/sql", json={"query": "SELECT 1"}), 422)
    _error(http.post("/api/lc", json={"model": "net", "points": [[0, 0]]}), 400)  # no radius
    _error(
        http.post(
            "/api/lc", json={"model": "net", "points": [[0, 0]], "dataset": "pts", "radius": 0.1}
        ),
        400,
    )
    err = _error(
        http.post("/api/lc", json={"model": "net", "radius": 0.1, "points": [[0.0, 0.0]] * 501}),
        400,
    )
    assert "--max-points" in err["message"]
    err = _error(http.post("/api/boundary/samples", json={"model": "net", "n": 5001}), 400)
    assert "--max-samples" in err["message"]
    huge = b'{"sql": "' + b"x" * (9 * 2**20) + b'"}'
    err = _error(
        http.post("/api/sql", content=huge, headers={"content-type": "application/json"}), 413
    )
    assert "--max-body" in err["message"]
    _error(http.get("/api/nothing/here"), 404)
    _error(http.post("/api/points/regions", json={"model": "nope", "points": [[0, 0]]}), 404)
    _error(http.post("/api/lc", json={"model": "net", "dataset": "nope", "radius": 0.1}), 404)
    _error(http.post("/api/jobs", json={}), 403)  # no tokens: nobody may submit
    assert http.get("/healthz").json()["status"] == "ok" and server.alive


def test_metrics_docs_and_viewer_page(http: httpx.Client) -> None:
    http.get("/api/models")
    http.get("/api/partitions", params={"model": "nope"})
    text = http.get("/metrics").text
    assert "# TYPE geomstore_requests_total counter" in text
    assert 'geomstore_requests_total{endpoint="/api/models",method="GET",status="200"}' in text
    assert 'status="404"' in text and "geomstore_request_seconds_bucket" in text
    assert 'geomstore_query_seconds_count{endpoint="/api/models"}' in text
    assert 'geomstore_errors_total{endpoint="/api/partitions",type="NotFoundError"}' in text
    docs = http.get("/docs")
    assert docs.status_code == 200
    # Swagger UI comes from this server (the swagger-ui-bundle package), never a CDN
    assert "cdn" not in docs.text.lower() and "https://" not in docs.text
    js = http.get("/static/swagger/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    paths = http.get("/openapi.json").json()["paths"]
    for p in (
        "/api/sql",
        "/api/lc",
        "/api/lc/trajectory",
        "/api/stats",
        "/api/compare",
        "/api/boundary/samples",
        "/api/points/regions",
        "/api/partitions/{partition_id}/{table}",
        "/api/jobs",
        "/healthz",
        "/metrics",
    ):
        assert p in paths, p
    page = http.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "cdn" not in page.text.lower()
    assert http.get("/static/viewer.js").status_code == 200
    assert (
        "access-control-allow-origin"
        not in http.get("/api/models", headers={"Origin": "http://evil.example"}).headers
    )


# access -----------------------------------------------------------------------------------
def _export(tmp_path: Path) -> Path:
    import torch

    from tests.nets import mlp

    prog = torch.export.export(mlp((4,), 2, seed=1), (torch.zeros(1, 2),))
    path = tmp_path / "ckpt.pt2"
    torch.export.save(prog, path)
    return path


def test_tokens_read_only_and_read_write(store_path: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# who may read\n{RO} ro notebooks\n{RW} rw trainer\n")
    ckpt = _export(tmp_path)
    with serve(store_path, "--token-file", str(tokens), log=tmp_path / "server.log") as srv:
        assert httpx.get(srv.url + "/healthz").status_code == 200
        _error(httpx.get(srv.url + "/api/models"), 401)
        _error(httpx.get(srv.url + "/api/models", headers={"Authorization": "Bearer wrong"}), 401)
        ok = httpx.get(srv.url + "/api/models", headers={"Authorization": f"Bearer {RO}"})
        assert ok.status_code == 200
        with geomstore.connect(srv.url, token=RO) as ro:
            assert ro.partitions(model="net").num_rows == 3
            with pytest.raises(geomstore.GeomstoreError, match="read-write token"):
                ro.submit(ckpt, geomstore.Slice.box((-1, -1), (1, 1)), model="remote")
        with (
            geomstore.connect(srv.url) as anonymous,
            pytest.raises(geomstore.GeomstoreError, match="needs a token"),
        ):
            anonymous.models()
        with geomstore.connect(srv.url, token=RW) as rw:
            box = geomstore.Slice.box((-1, -1), (1, 1), name="box2")
            job = rw.submit(ckpt, box, model="remote", checkpoint="c0", step=0)
            assert job == rw.submit(ckpt, box, model="remote", checkpoint="c0", step=0)
            got = rw.sql("SELECT job_id FROM jobs").table.column("job_id").to_pylist()
            assert job in got
            assert rw.job(job)["status"] == "queued"
            with pytest.raises(NotFoundError, match="no job"):
                rw.job("nosuch")
        # the queue is read with a read token, over HTTP, before and after a worker ran it
        with geomstore.connect(srv.url, token=RO) as ro:
            queued = ro.jobs(status="queued")
            assert queued.column("job_id").to_pylist() == [job]
            assert "token" not in queued.column_names  # a worker's claim token stays inside
            assert ro.jobs(status="done", model="remote").num_rows == 0
            bad = httpx.get(
                srv.url + "/api/jobs?status=lost", headers={"Authorization": f"Bearer {RO}"}
            )
            _error(bad, 422)
            worker = subprocess.run(
                [sys.executable, "-m", "geomstore", "worker", store_path, "--once"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert worker.returncode == 0, worker.stderr
            row = ro.job(job)
            assert row["status"] == "done" and row["error"] is None
            assert (
                row["partition_id"]
                in ro.partitions(model="remote").column("partition_id").to_pylist()
            )


def test_token_files_and_binding_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("short ro\n")
    with pytest.raises(AccessError, match="line 1"):
        load_tokens(bad)
    bad.write_text(f"{RO} admin\n")
    with pytest.raises(AccessError, match="ro\\|rw"):
        load_tokens(bad)
    from geomstore.service import check_bind

    cfg = ServiceConfig(store=str(tmp_path))
    with pytest.raises(AccessError, match="--insecure"):
        check_bind("0.0.0.0", cfg, insecure=False)
    check_bind("0.0.0.0", cfg, insecure=True)
    check_bind("127.0.0.1", cfg, insecure=False)


def test_serve_refuses_a_public_host_without_tokens(store_path: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "geomstore", "serve", store_path, "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("Error: refusing to serve on 0.0.0.0")
    assert "Traceback" not in res.stderr


def test_cors_only_when_configured(store_path: str) -> None:
    app = create_app(ServiceConfig(store=store_path, cors_origins=("http://notebook.local",)))
    with TestClient(app) as c:
        resp = c.get("/api/models", headers={"Origin": "http://notebook.local"})
        assert resp.headers["access-control-allow-origin"] == "http://notebook.local"
        other = c.get("/api/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_cli_query_commands_take_the_service_url(
    server: Server, store_path: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from geomstore.cli import app

    runner = CliRunner()
    for args in (
        ["stats", "--model", "net", "-f", "json"],
        ["lc", "--model", "net", "--points", "pts", "--radius", "0.1", "-f", "json"],
        ["lc", "--model", "net", "--grid", "5", "--radius", "0.1", "-f", "csv"],
        ["sample", "--model", "net", "-n", "7", "--seed", "2", "-f", "json"],
        ["partitions", "--model", "net", "-f", "json"],
        ["sql", "SELECT count(*) AS n FROM regions", "-f", "json"],
    ):
        here = runner.invoke(app, [args[0], store_path, *args[1:]])
        remote = runner.invoke(app, [args[0], server.url, *args[1:]])
        assert here.exit_code == 0, here.output
        assert remote.exit_code == 0, remote.output
        assert remote.stdout == here.stdout, args
    res = runner.invoke(app, ["plot", server.url, "--model", "net", "-o", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").stat().st_size > 10_000
    res = runner.invoke(app, ["init", server.url])
    assert res.exit_code == 1 and "answers queries only" in str(res.exception)


def test_json_cells_are_plain(http: httpx.Client) -> None:
    res = http.post(
        "/api/sql", json={"sql": "SELECT 'nan'::DOUBLE AS x, '\\x01'::BLOB AS b, [1, 2] AS l"}
    ).json()
    assert res["rows"] == [{"x": None, "b": "01", "l": [1, 2]}]
    json.dumps(res)
