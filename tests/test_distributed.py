"""Ray: one task per checkpoint x slice against a real local cluster (one per module)."""

from __future__ import annotations

import copy
import glob
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import geomstore
from geomstore.errors import ExecutorError
from geomstore.jobs import JobResult
from tests.nets import BOX, mlp
from tests.servers import free_port, start_ray

ray = pytest.importorskip("ray")

SLICES = [BOX, geomstore.Slice.box((0.0, -0.5), (2.0, 1.5), name="shifted")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    start_ray()
    try:
        yield
    finally:
        ray.shutdown()


def _export(path: Path, net: torch.nn.Module) -> Path:
    torch.export.save(torch.export.export(net.eval(), (torch.zeros(1, 2),)), str(path))
    return path


class Sigmoid(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.lin(x))


def _counts(store: geomstore.Store) -> list[dict[str, object]]:
    """Each partition with its stored n_regions and the regions actually there."""
    return store.sql(
        "SELECT p.partition_id, p.n_regions, "
        "(SELECT count(*) FROM regions r WHERE r.partition_id = p.partition_id) AS nr "
        "FROM partitions p ORDER BY 1"
    ).table.to_pylist()


def _kill_first_task(name: str, seconds: float, killed: list[int]) -> None:
    """SIGKILL the first Ray worker seen running a task called ``name`` (proc title)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not killed:
        for f in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                cmd = Path(f).read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(f"ray::{name}"):
                pid = int(f.split("/")[2])
                time.sleep(0.2)  # let it get into its computation
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(pid)
                return
        time.sleep(0.01)


def test_ray_runs_every_job_once_and_reports_bad_ones(cluster: None, tmp_path: Path) -> None:
    ckpts = [_export(tmp_path / f"step-{i}.pt2", mlp((12, 12), 3, seed=i)) for i in range(3)]
    garbage = tmp_path / "step-7.pt2"
    garbage.write_bytes(b"not a checkpoint at all")
    sigmoid = _export(tmp_path / "step-8.pt2", Sigmoid())
    files = [*ckpts, garbage, sigmoid]
    seen: list[JobResult] = []
    with geomstore.open(tmp_path / "ray-store") as store:
        res = geomstore.compute(
            store,
            files,
            SLICES,
            model="m",
            device="cpu",
            verify=True,
            executor="ray",
            on_result=seen.append,
        )
        assert len(res.results) == len(seen) == 10
        assert len(res.done) == 6 and all(r.verified for r in res.done)
        errors = {(r.checkpoint, r.error_type) for r in res.failed}
        assert errors == {("step-7", "ModelLoadError"), ("step-8", "UnsupportedModelError")}
        assert all("sigmoid" in (r.error or "") for r in res.failed if r.checkpoint == "step-8")
        rows = _counts(store)
        assert len(rows) == 6 and all(r["n_regions"] == r["nr"] for r in rows)
        assert sorted(r["partition_id"] for r in rows) == sorted(res.partition_ids)
        steps = store.sql("SELECT step FROM gs_partitions ORDER BY 1").table
        assert steps.column("step").to_pylist() == [0, 0, 1, 1, 2, 2]
        rows_of = store.sql(
            "SELECT (SELECT count(*) FROM models) AS m, (SELECT count(*) FROM checkpoints) AS c, "
            "(SELECT count(*) FROM slices) AS s"
        ).table.to_pylist()
        assert rows_of == [{"m": 1, "c": 3, "s": 2}]  # catalog rows written once each
        # the same checkpoints again: content ids make every write a no-op
        again = geomstore.compute(store, ckpts, SLICES, model="m", device="cpu", executor="ray")
        assert sorted(again.partition_ids) == sorted(res.partition_ids)
        assert _counts(store) == rows
    # the same jobs computed here, in this process, give the same partitions
    with geomstore.open(tmp_path / "local-store") as local:
        here = geomstore.compute(local, ckpts, SLICES, model="m", device="cpu")
        assert here.partition_ids == [r.partition_id for r in res.results if r.ok]
        assert _counts(local) == rows


def test_a_killed_worker_is_retried_and_each_partition_lands_once(
    cluster: None, tmp_path: Path
) -> None:
    ckpts = [_export(tmp_path / f"step-{i}.pt2", mlp((48, 48), 3, seed=i)) for i in range(4)]
    killed: list[int] = []
    killer = threading.Thread(target=_kill_first_task, args=("_task", 120.0, killed))
    killer.start()
    try:
        with geomstore.open(tmp_path / "store") as store:
            res = geomstore.compute(store, ckpts, SLICES, model="m", device="cpu", executor="ray")
            rows = _counts(store)
    finally:
        killer.join(timeout=130)
    assert killed, "no Ray worker was seen running a task"
    assert not res.failed, [r.line() for r in res.failed]
    assert len(res.done) == 8 and len(set(res.partition_ids)) == 8
    assert len(rows) == 8 and all(r["n_regions"] == r["nr"] for r in rows)


def test_cli_compute_on_ray(cluster: None, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from geomstore.cli import app

    ckpts = [str(_export(tmp_path / f"step-{i}.pt2", mlp((8,), 2, seed=i))) for i in range(2)]
    store = str(tmp_path / "store")
    # a bare --ray before the checkpoints does not swallow one of them as its address
    res = CliRunner().invoke(
        app, ["compute", store, "--ray", *ckpts, "-m", "m", "--box=-1,-1,1,1", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    assert "2 of 2 partition(s) stored, 0 failed" in res.output
    assert "(ray)" in res.output
    with geomstore.open(store, read_only=True) as s:
        assert len(_counts(s)) == 2


def test_bad_executor_options_are_refused(tmp_path: Path) -> None:
    ckpt = _export(tmp_path / "step-1.pt2", mlp((8,), 2))
    with geomstore.open(tmp_path / "store") as store:
        with pytest.raises(ExecutorError, match=r"executor='spark' is not one of 'local', 'ray'"):
            geomstore.compute(store, [ckpt], BOX, model="m", executor="spark")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="address= names a Ray cluster"):
            geomstore.compute(store, [ckpt], BOX, model="m", address="ray://x:1")
        with pytest.raises(geomstore.GeomstoreError, match="does not exist"):
            geomstore.compute(store, [tmp_path / "nope.pt2"], BOX, model="m")
    with (
        geomstore.open(tmp_path / "one.duckdb") as store,
        pytest.raises(ExecutorError, match="belongs to one process"),
    ):
        geomstore.compute(store, [ckpt], BOX, model="m", executor="ray")


def test_recorder_hands_checkpoints_to_ray_while_training_goes_on(
    cluster: None, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    net = mlp((16, 16), 3, seed=5).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    snaps: dict[int, torch.nn.Module] = {}
    with geomstore.open(tmp_path / "store") as store:
        with geomstore.Recorder(store, "run", SLICES, every=2, executor="ray", device="cpu") as rec:
            for step in range(6):
                ids = rec(net, step, metrics={"loss": float(step)})
                assert len(ids) == (2 if step % 2 == 0 else 0)
                if ids:
                    snaps[step] = copy.deepcopy(net).eval()
                loss = net(torch.randn(32, 2)).pow(2).mean()  # the weights move on
                opt.zero_grad()
                loss.backward()
                opt.step()
            assert net.training  # the recorder restored the training mode
            results = rec.wait(timeout=300)
        # a model Ray cannot partition reports its error per job; the recorder goes on
        with geomstore.Recorder(store, "bad", SLICES, executor="ray", device="cpu") as bad:
            bad(Sigmoid(), 0)
            bad_results = bad.wait(timeout=300)
        assert [r.error for r in results] == [None] * 6, [r.line() for r in results]
        assert [r.checkpoint for r in results] == [f"step-{s}" for s in (0, 0, 2, 2, 4, 4)]
        assert len({r.partition_id for r in results}) == 6
        assert [r.error_type for r in bad_results] == ["UnsupportedModelError"] * 2
        rows = _counts(store)
        assert len(rows) == 6 and all(r["n_regions"] == r["nr"] for r in rows)
        listed = store.partitions(model="run").to_pylist()
        assert sorted(p["step"] for p in listed) == [0, 0, 2, 2, 4, 4]
        for r, sl in zip(results, SLICES * 3, strict=True):
            step = int(r.checkpoint.split("-")[1])
            part = store.load_partition(r.partition_id)
            local = geomstore.partition(snaps[step], sl, device="cpu")
            assert part.n_regions == local.n_regions
            report = part.verify(snaps[step])  # the weights of that step, not the final ones
            assert report.ok, str(report)


def test_recorder_ray_refusals(tmp_path: Path) -> None:
    with geomstore.open(tmp_path / "store") as store:
        with pytest.raises(geomstore.GeomstoreError, match="executor='spark' is not one of"):
            geomstore.Recorder(store, "m", BOX, executor="spark")
        with pytest.raises(geomstore.GeomstoreError, match="exclude each other"):
            geomstore.Recorder(store, "m", BOX, executor="ray", queue=True)
    with (
        geomstore.open(tmp_path / "one.duckdb") as store,
        pytest.raises(ExecutorError, match="belongs to one process"),
    ):
        geomstore.Recorder(store, "m", BOX, executor="ray")


def test_a_bad_checkpoint_on_ray_names_the_users_file(cluster: None, tmp_path: Path) -> None:
    garbage = tmp_path / "step-7.pt2"
    garbage.write_bytes(b"not a checkpoint at all")
    with geomstore.open(tmp_path / "store") as store:
        res = geomstore.compute(store, [garbage], BOX, model="m", device="cpu", executor="ray")
    [bad] = res.failed
    assert bad.error_type == "ModelLoadError"
    # the same words as the local executor's, not the worker's temporary copy
    assert (bad.error or "").startswith(f"{garbage} is not a readable torch.export program")
    assert "geomstore-ray-" not in (bad.error or "")


def test_an_unreachable_cluster_is_refused_within_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_cli_fixes import fail

    closed = free_port()  # nothing listens there
    ckpt = _export(tmp_path / "step-1.pt2", mlp((8,), 2))
    start = time.monotonic()
    line = fail(
        "compute", tmp_path / "s", ckpt, "-m", "m", "--box=-1,-1,1,1", f"--ray=127.0.0.1:{closed}"
    )
    assert line.startswith(
        f"Error: cannot join the Ray cluster at 127.0.0.1:{closed}: nothing answers at "
        f"127.0.0.1:{closed} within 5 s (ConnectionRefusedError"
    ), line
    assert time.monotonic() - start < 120  # ray.init alone waited for ever
    from geomstore.distributed import _join_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ExecutorError, match="cannot join the Ray cluster at ray://"):
        _join_address(f"ray://127.0.0.1:{closed}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed}")
    with pytest.raises(ExecutorError, match=r"\(\$RAY_ADDRESS\): nothing answers"):
        _join_address(None)
    monkeypatch.delenv("RAY_ADDRESS")
    # Ray's current-cluster file names a cluster that is gone: a new local one, or for
    # "auto" (an existing cluster or nothing) an error that says how to fix it
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed}\n")
    assert _join_address(None) == "local"
    with pytest.raises(ExecutorError, match=r"ray_current_cluster file.*ray start --head"):
        _join_address("auto")


def test_ray_client_addresses_need_ray_client(monkeypatch: pytest.MonkeyPatch) -> None:
    from geomstore.distributed import _connect

    monkeypatch.setitem(sys.modules, "grpc", None)  # as if ray[client] were not installed
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whatever cluster is up here
    with pytest.raises(ExecutorError, match=r'Ray Client.*: pip install "ray\[client\]"'):
        _connect(f"ray://127.0.0.1:{free_port()}")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["ray"]
    assert any(req.startswith("ray[client]>=") for req in extra), extra
