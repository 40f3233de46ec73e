"""Stores whose data files live in S3: the store's own cases against a real moto server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import geomstore
from geomstore.errors import DataPathError, MissingExtensionError, StoreError
from geomstore.store.objectstore import S3Settings, normalize_data_path
from tests.nets import BOX, mlp
from tests.s3server import S3Server, s3_server

ROOT = Path(__file__).resolve().parents[1]
_AWS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "GEOMSTORE_S3_ENDPOINT",
    "GEOMSTORE_S3_URL_STYLE",
    "GEOMSTORE_DATA_PATH",
)


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with s3_server() as s:
        yield s


@pytest.fixture
def aws(server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """The standard AWS variables point at the server (subprocesses inherit them)."""
    for k in _AWS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    return server


@pytest.fixture(scope="module")
def parts() -> list[geomstore.Partition]:
    return [geomstore.partition(mlp((16, 16), 3, seed=i), BOX, device="cpu") for i in range(3)]


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.store_worker", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _count(store: geomstore.Store, sql: str) -> int:
    return int(store.sql(sql).table.column(0)[0].as_py())


def _local_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.parquet")]


# settings and data paths (no server needed) ------------------------------------------------
def test_settings_come_from_env_then_profile(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(
        "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = sdefault\n"
        "[lab]\naws_access_key_id = AKLAB\naws_secret_access_key = slab\n"
        "aws_session_token = tlab\n"
    )
    conf = tmp_path / "config"
    conf.write_text("[profile lab]\nregion = eu-west-3\nendpoint_url = https://minio.lab:9000\n")
    files = {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_CONFIG_FILE": str(conf)}
    lab = S3Settings.from_env({**files, "AWS_PROFILE": "lab"})
    assert (lab.key_id, lab.secret, lab.session_token) == ("AKLAB", "slab", "tlab")
    assert (lab.region, lab.endpoint, lab.use_ssl, lab.url_style) == (
        "eu-west-3",
        "minio.lab:9000",
        True,
        "path",
    )
    default = S3Settings.from_env(files)
    assert (default.key_id, default.region, default.endpoint) == ("AKDEFAULT", "us-east-1", None)
    assert default.url_style == "vhost"
    env = S3Settings.from_env(
        {
            **files,
            "AWS_PROFILE": "lab",
            "AWS_ACCESS_KEY_ID": "AKENV",
            "AWS_SECRET_ACCESS_KEY": "senv",
            "AWS_DEFAULT_REGION": "ap-south-1",
            "AWS_ENDPOINT_URL": "http://10.0.0.5:9000",
            "GEOMSTORE_S3_ENDPOINT": "http://127.0.0.1:9100/",
        }
    )
    assert (env.key_id, env.secret, env.session_token) == ("AKENV", "senv", None)
    assert (env.region, env.endpoint, env.use_ssl) == ("ap-south-1", "127.0.0.1:9100", False)
    assert "senv" not in repr(env) and "AKENV" not in repr(env)
    assert S3Settings.from_env({}).key_id is None  # anonymous


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"AWS_ACCESS_KEY_ID": "AK"}, "no secret key"),
        ({"GEOMSTORE_S3_ENDPOINT": "ftp://x/y"}, "not a URL like"),
        ({"GEOMSTORE_S3_URL_STYLE": "sideways"}, "not one of 'path', 'vhost'"),
    ],
)
def test_bad_settings_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(DataPathError, match=match):
        S3Settings.from_env(env)


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("gs://bucket/p", "only s3:// URLs"),
        ("az://bucket/p", "only s3:// URLs"),
        ("s3://AKIA:hunter2@bucket/p", "holds credentials"),
        ("s3://Bad_Bucket/p", "not a valid bucket name"),
        ("s3://b/p", "not a valid bucket name"),
        ("s3://bucket/it's", "quotes"),
    ],
)
def test_bad_data_paths_are_refused(path: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(DataPathError, match=match) as info:
        geomstore.open(tmp_path / "s", data_path=path)
    assert "hunter2" not in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "s").exists()


def test_normalized_data_paths() -> None:
    assert normalize_data_path("s3://bucket/a/b") == "s3://bucket/a/b/"
    assert normalize_data_path("s3://bucket") == "s3://bucket/"
    assert normalize_data_path("/tmp/x/../y") == "/tmp/y/"


def test_duckdb_file_store_refuses_a_data_path(tmp_path: Path) -> None:
    with pytest.raises(DataPathError, match="keeps its data inside the file"):
        geomstore.open(tmp_path / "one.duckdb", data_path="s3://bucket/p/")
    assert not (tmp_path / "one.duckdb").exists()


def test_directory_store_uses_a_local_data_path(tmp_path: Path) -> None:
    """The bug of the issue: a directory store with data_path= wrote into its own folder."""
    part = geomstore.partition(mlp((8,), 2), BOX, device="cpu")
    with geomstore.open(tmp_path / "s", data_path=tmp_path / "elsewhere") as s:
        s.add(part, model="n", checkpoint="a")
        assert s.data_path == f"{(tmp_path / 'elsewhere').resolve()}/"
    assert _local_files(tmp_path / "elsewhere") and not _local_files(tmp_path / "s")
    with geomstore.open(tmp_path / "s", read_only=True) as s:  # the catalog remembers
        assert _count(s, "SELECT count(*) FROM regions") == part.n_regions
    with pytest.raises(DataPathError, match="keeps its data files at"):
        geomstore.open(tmp_path / "s", data_path=tmp_path / "other")


def test_missing_httpfs_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import duckdb

    from geomstore.store.connection import load_optional

    monkeypatch.setitem(sys.modules, "duckdb_extension_httpfs", None)  # not installed
    con = duckdb.connect(config={"extension_directory": str(tmp_path / "ext")})
    try:
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        with pytest.raises(MissingExtensionError, match=r"pip install geomstore\[s3\]"):
            load_optional(con, "httpfs")
    finally:
        con.close()


# against the S3 server ---------------------------------------------------------------------
def test_directory_store_with_data_in_s3(
    aws: S3Server, parts: list[geomstore.Partition], tmp_path: Path
) -> None:
    from geomstore.queries import local_complexity, partition_stats, point_regions

    bucket = aws.bucket()
    url = f"s3://{bucket}/runs/a"
    local, remote = tmp_path / "local", tmp_path / "remote"
    with geomstore.open(local) as a, geomstore.open(remote, data_path=url) as b:
        assert b.data_path == url + "/"
        for i, part in enumerate(parts):
            for s in (a, b):
                s.add(part, model="net", checkpoint=f"c{i}", step=i)
        # a second add of the same partition writes nothing
        assert b.add(parts[0], model="net", checkpoint="c0", step=0)
        assert _count(b, "SELECT count(*) FROM partitions") == len(parts)
    keys = aws.keys(bucket)
    assert keys and all(k.startswith("runs/a/") and k.endswith(".parquet") for k in keys)
    assert not _local_files(remote), "data files were written beside the catalog"
    u = np.random.default_rng(0).uniform(-0.9, 0.9, (20, 2))
    with geomstore.open(local, read_only=True) as a, geomstore.open(remote, read_only=True) as b:
        assert b.data_path == url + "/"
        area = b.sql("SELECT partition_id, sum(ST_Area(geometry)) AS a FROM regions GROUP BY 1")
        assert all(abs(x - 4.0) < 1e-9 for x in area.table.column("a").to_pylist())
        for q in (
            lambda s: local_complexity(s, model="net", points=u, radius=0.2),
            lambda s: partition_stats(s, model="net"),
            lambda s: point_regions(s, model="net", points=u),
        ):
            assert q(a).to_pylist() == q(b).to_pylist()
        pid = b.sql("SELECT partition_id FROM partitions WHERE n_regions = ?", [parts[1].n_regions])
        back = b.load_partition(pid.table.column(0)[0].as_py())
        for col in ("region_id", "area", "pattern", "A", "c", "geometry"):
            assert back.regions.column(col).to_pylist() == parts[1].regions.column(col).to_pylist()
        files = b.export(tmp_path / "out")
        import pyarrow.parquet as pq

        regions = next(f for f in files if f.name == "regions.parquet")
        assert b"geo" in (pq.read_schema(regions).metadata or {})
        assert pq.read_table(regions).num_rows == sum(p.n_regions for p in parts)


def test_the_secret_never_comes_back(aws: S3Server, tmp_path: Path) -> None:
    bucket = aws.bucket()
    path = tmp_path / "s"
    leaks: list[str] = []
    with geomstore.open(path, data_path=f"s3://{bucket}/p/") as s:
        s.add(geomstore.partition(mlp((8,), 2), BOX, device="cpu"), model="n", checkpoint="a")
        leaks.append(repr(s.__dict__))
        for q in (
            "SELECT * FROM duckdb_secrets()",
            "SELECT * FROM duckdb_secrets(redact=false)",
            "SELECT current_setting('s3_secret_access_key') AS v",
            "SELECT * FROM duckdb_settings()",
            "SELECT getenv('AWS_SECRET_ACCESS_KEY') AS v",
        ):
            try:
                leaks.append(str(s.sql(q).table.to_pylist()))
            except Exception as exc:  # refused is fine; the message must not hold the key
                leaks.append(str(exc))
            # the reader (for the user's own SQL, without the sandbox's rules) and the
            # writer's connection, and new cursors of both, hold no key either
            for con in (s.reader(), s.con, s.con.cursor(), s.reader().cursor()):
                try:
                    leaks.append(str(con.execute(q).fetchall()))
                except Exception as exc:
                    leaks.append(str(exc))
        s.export(tmp_path / "out")
    for f in [*path.rglob("*"), *(tmp_path / "out").rglob("*")]:
        if f.is_file():
            leaks.append(f.read_bytes().decode("latin-1"))
    leaks.append(aws.read_all(bucket).decode("latin-1"))
    # a failing open (the bucket does not exist) names the problem, not the keys
    with pytest.raises(StoreError, match="no-such-bucket-here") as info:
        geomstore.open(tmp_path / "t", data_path="s3://no-such-bucket-here/p/")
    leaks.append(str(info.value))
    leaks += [p.read_bytes().decode("latin-1") for p in (tmp_path / "t").rglob("*") if p.is_file()]
    assert aws.secret not in "".join(leaks)


def test_readers_in_other_processes_never_see_a_partial_partition(
    aws: S3Server, tmp_path: Path
) -> None:
    path = str(tmp_path / "shared")
    geomstore.open(path, data_path=f"s3://{aws.bucket()}/shared/").close()
    readers = [_spawn("read", path, "30") for _ in range(2)]  # long enough on a busy CI
    writer = _spawn("write", path, "0", "6", "40")
    _, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    seen = []
    for r in readers:
        rout, rerr = r.communicate(timeout=300)
        assert r.returncode == 0, rerr
        seen.append(int(rout.strip().splitlines()[-1]))
    assert max(seen) >= 1, "the readers never saw a partition while the writer wrote"
    with geomstore.open(path, read_only=True) as s:
        assert _count(s, "SELECT count(*) FROM partitions") == 6


def test_sigkill_mid_write_leaves_nothing_half_visible(aws: S3Server, tmp_path: Path) -> None:
    path = str(tmp_path / "killed")
    bucket = aws.bucket()
    with geomstore.open(path, data_path=f"s3://{bucket}/k/") as s:
        s.add(geomstore.partition(mlp((8, 8), 2), BOX, device="cpu"), model="n", checkpoint="a")
    before = len(aws.keys(bucket))
    writer = _spawn("write", path, "100", "50", "120")
    end = time.monotonic() + 120
    while len(aws.keys(bucket)) <= before and time.monotonic() < end:
        time.sleep(0.05)  # kill once the writer has started putting objects in the bucket
    time.sleep(0.3)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    with geomstore.open(path) as s:
        rows = s.sql(
            "SELECT p.n_regions, p.n_edges, "
            "(SELECT count(*) FROM regions r WHERE r.partition_id = p.partition_id) AS nr, "
            "(SELECT count(*) FROM edges e WHERE e.partition_id = p.partition_id) AS ne "
            "FROM partitions p"
        ).table.to_pylist()
        assert 1 <= len(rows) < 51
        assert all(r["n_regions"] == r["nr"] and r["n_edges"] == r["ne"] for r in rows)
        orphans = _count(
            s,
            "SELECT count(*) FROM regions WHERE partition_id NOT IN "
            "(SELECT partition_id FROM partitions)",
        )
        assert orphans == 0
        late = geomstore.partition(mlp((8, 8), 2, seed=5), BOX, device="cpu")
        s.add(late, model="n", checkpoint="b")
        assert _count(s, "SELECT count(*) FROM partitions") == len(rows) + 1


def test_postgres_catalog_with_data_in_s3(
    aws: S3Server, parts: list[geomstore.Partition], tmp_path: Path
) -> None:
    from tests.pgserver import postgres_server

    bucket = aws.bucket()
    url = f"s3://{bucket}/pg"
    with postgres_server(tmp_path / "pg") as dsn:
        target = f"postgres:{dsn}"
        with geomstore.open(target, data_path=url) as s:
            pid = s.add(parts[0], model="net", checkpoint="init", step=0)
        with geomstore.open(target, data_path=url, read_only=True) as s:
            assert _count(s, "SELECT count(*) FROM regions") == parts[0].n_regions
            back = s.load_partition(pid)
            assert back.n_regions == parts[0].n_regions
        with pytest.raises(DataPathError, match="keeps its data files at"):
            geomstore.open(target, data_path=f"s3://{bucket}/other")
    assert aws.keys(bucket) and all(k.startswith("pg/") for k in aws.keys(bucket))


def test_cli_takes_the_data_path_from_the_environment(
    aws: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from geomstore.cli import app

    bucket = aws.bucket()
    monkeypatch.setenv("GEOMSTORE_DATA_PATH", f"s3://{bucket}/cli/")
    store = str(tmp_path / "s")
    ckpt = tmp_path / "step-1.pt2"
    import torch

    net = mlp((8,), 2)
    torch.export.save(torch.export.export(net, (torch.zeros(1, 2),)), str(ckpt))
    res = CliRunner().invoke(app, ["compute", store, str(ckpt), "-m", "m", "--box=-1,-1,1,1"])
    assert res.exit_code == 0, res.output
    assert aws.keys(bucket) and not _local_files(tmp_path / "s")
    assert aws.secret not in res.output


def test_an_unreachable_s3_endpoint_is_one_store_error(
    aws: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads whose data files cannot be fetched raise StoreError naming the data path (the
    API) and print one 'Error: ...' line (the command line), never DuckDB's IOException."""
    import re

    from geomstore.errors import SQLError
    from geomstore.queries import partition_stats
    from tests.servers import free_port
    from tests.test_cli_fixes import fail

    path, url = tmp_path / "s", f"s3://{aws.bucket()}/p/"
    with geomstore.open(path, data_path=url) as s:
        s.add(geomstore.partition(mlp((8,), 2), BOX, device="cpu"), model="m", checkpoint="a")
    monkeypatch.setenv("GEOMSTORE_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # closed
    said = rf"^cannot read the store's data at {re.escape(url)} \(IOException: .*; check the S3 "
    lines = []
    with geomstore.open(path, read_only=True) as s:
        for query in (
            s.partitions,
            lambda: s.sql("SELECT region_id FROM regions"),
            lambda: partition_stats(s, model="m"),
        ):
            with pytest.raises(StoreError, match=said) as info:
                query()
            assert not isinstance(info.value, SQLError)  # the data path, not the query
            lines.append(str(info.value))
    assert all("\n" not in line for line in lines)
    assert fail("partitions", path).startswith(f"Error: cannot read the store's data at {url} (")
    assert fail("stats", path, "-m", "m").startswith(
        f"Error: cannot read the store's data at {url}"
    )
    # the query service says the backend, not the request, failed: 503, one line, no secret
    from fastapi.testclient import TestClient

    from geomstore.service import ServiceConfig, create_app

    with TestClient(create_app(ServiceConfig(store=str(path)))) as http:
        resp = http.get("/api/partitions")
    assert resp.status_code == 503, resp.text
    err = resp.json()["error"]
    assert err["type"] == "DataUnavailableError" and err["message"].startswith("cannot read")
    lines.append(resp.text)
    exported = fail("export", path, tmp_path / "out")
    assert exported.startswith(f"Error: cannot read the store's data at {url} (IOException: ")
    assert aws.secret not in "".join([*lines, exported])
