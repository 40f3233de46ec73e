"""The throughput knobs users and benchmarks turn: chunk sizes, budgets, benchmark flags.

A wrong value is one clear line naming the knob and the fix; the knobs that change only
how the work is chunked are recorded with a partition but never change what it is stored
as; the benchmarks refuse what they cannot measure here instead of printing a meaningless
figure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from geomstore import GeomstoreError, Store, partition
from geomstore.errors import MemoryBudgetError
from tests.nets import BOX, mlp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "x", 2.0])
def test_chunk_elements_must_be_a_positive_whole_number(bad: object) -> None:
    with pytest.raises(GeomstoreError, match="chunk_elements must be a positive whole number"):
        partition(mlp((4,), 1), BOX, device="cpu", chunk_elements=bad)  # type: ignore[arg-type]


def test_a_chunk_too_small_for_one_cell_names_chunk_elements_not_memory() -> None:
    with pytest.raises(MemoryBudgetError, match=r"more than chunk_elements=1;.*raise chunk_"):
        partition(mlp((4,), 1), BOX, device="cpu", chunk_elements=1)


def test_chunking_is_recorded_but_a_partition_is_stored_once(tmp_path: Path) -> None:
    net = mlp((10, 10), 2, seed=5)
    whole = partition(net, BOX, device="cpu")
    chunked = partition(net, BOX, device="cpu", chunk_elements=3000)
    assert chunked.settings["chunk_elements"] == 3000
    assert whole.settings["chunk_elements"] is None
    # the same regions (chunks change their order and, at most, the last bits of A)
    assert sorted(bytes(s) for s in whole.states) == sorted(bytes(s) for s in chunked.states)
    np.testing.assert_allclose(
        np.sort(np.asarray(whole.regions.column("area"))),
        np.sort(np.asarray(chunked.regions.column("area"))),
        rtol=1e-12,
    )
    with Store(tmp_path / "s") as store:
        first = store.add(whole, model="m", checkpoint="c")
        again = store.add(chunked, model="m", checkpoint="c")
        assert first == again  # how it was chunked is not part of what it is
        assert store.sql("SELECT count(*) AS n FROM partitions").table.column("n")[0].as_py() == 1


def test_the_same_call_repeats_bit_for_bit_at_any_one_budget() -> None:
    net = mlp((24, 24, 24), 2, seed=9)
    for memory in ("64MiB", "2GiB"):
        a = partition(net, BOX, device="cpu", memory=memory)
        b = partition(net, BOX, device="cpu", memory=memory)
        for table in ("regions", "edges", "boundary"):
            assert getattr(a, table).equals(getattr(b, table)), (memory, table)


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeat", "0"], "--repeat: expected a whole number >= 1"),
        (["--widths", "8,x"], "--widths: expected hidden widths >= 1"),
        (["--widths", "0"], "--widths: expected hidden widths >= 1"),
        (["--device", "tpu"], "device must be one of"),
    ],
)
def test_the_partition_benchmark_refuses_bad_flags_in_one_line(
    args: list[str], message: str
) -> None:
    res = _bench("benchmarks/partition.py", *args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_the_benchmarks_refuse_a_gpu_comparison_without_a_gpu() -> None:
    for args, message in [
        (["benchmarks/partition.py", "--device", "cuda"], "CUDA is not available"),
        (["benchmarks/partition.py", "--compare-cpu"], "the device here is the CPU"),
        (["benchmarks/zoo.py", "--device", "cuda"], "CUDA is not available"),
        (["benchmarks/zoo.py", "--compare-cpu"], "--compare-cpu compares"),
    ]:
        res = _bench(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
        assert res.stdout == "", args  # no figure printed
    res = subprocess.run(
        ["bash", "benchmarks/cuda.sh", "/nonexistent-not-made"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2 and "no CUDA device here" in res.stderr, res.stderr


def test_cuda_sh_names_an_unknown_step_before_any_device_work(tmp_path: Path) -> None:
    env = {**os.environ, "STEPS": "tests zoo-r18 zoo-cnn"}  # zoo-cnn: the step is zoo-conv
    res = subprocess.run(
        ["bash", "benchmarks/cuda.sh", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2, res
    assert "no step 'zoo-cnn' in STEPS" in res.stderr and "zoo-conv" in res.stderr, res.stderr
    assert "== " not in res.stdout and "no CUDA device" not in res.stderr  # nothing ran
    assert "Traceback" not in res.stderr and "ERROR" not in res.stderr  # nor was installed


def test_a_store_opens_from_a_pathlib_path(tmp_path: Path) -> None:
    part = partition(mlp((6,), 1), BOX, device="cpu")
    with Store(tmp_path / "p", data_path=tmp_path / "p-data") as store:
        pid = store.add(part, model="m", checkpoint="c")
    with Store(tmp_path / "p", read_only=True) as store:
        assert store.data_path == str(tmp_path / "p-data") + "/"
        assert store.load_partition(pid).n_regions == part.n_regions
    with pytest.raises(GeomstoreError, match="store must be a path"):
        Store(42)  # type: ignore[arg-type]
