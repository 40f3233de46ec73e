"""Start ``geomstore serve`` as a real subprocess on a free loopback port (bounded waits).

Also builds the small stores the service tests share: model ``net`` (a 16-16 ReLU MLP
with 3 classes) on the slice ``box`` at several checkpoints, and the data set ``pts``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

import geomstore
from tests.nets import BOX, mlp

__all__ = ["SEEDS", "Server", "free_port", "make_store", "serve", "start_ray"]

SEEDS = (10, 6, 9)  # each has a decision boundary inside the box


def free_port() -> int:
    """A port nobody listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_store(path: Path, *, seeds: Sequence[int] = SEEDS, width: int = 16) -> str:
    """A store with model ``net`` at checkpoints step0, step100, ... and data set ``pts``."""
    with geomstore.open(path) as st:
        for i, seed in enumerate(seeds):
            part = geomstore.partition(mlp((width, width), 3, seed=seed), BOX, device="cpu")
            st.add(
                part,
                model="net",
                checkpoint=f"step{100 * i}",
                step=100 * i,
                metrics={"acc": i / len(seeds)},
            )
        rng = np.random.default_rng(0)
        st.add_points("pts", BOX, rng.uniform(-1, 1, (40, 2)), labels=rng.integers(0, 3, 40))
    return str(path)


class Server:
    """One ``geomstore serve`` process; ``url`` is where it answers."""

    def __init__(self, store: str, *args: str, port: int | None = None, log: Path | None = None):
        self.store = store
        self.args = list(args)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: float = 60.0) -> Server:
        """Start the process and wait (at most ``wait`` s) until /healthz answers 200."""
        cmd = [
            sys.executable,
            "-m",
            "geomstore",
            "serve",
            self.store,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"geomstore serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"geomstore serve did not answer /healthz within {wait} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout`` s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout)

    @property
    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc is not None and self.proc.poll() is None


@contextmanager
def serve(store: str, *args: str, log: Path | None = None) -> Iterator[Server]:
    """A started server over ``store``, stopped on exit."""
    server = Server(store, *args, log=log)
    try:
        yield server.start()
    finally:
        server.stop()


def start_ray() -> None:
    """A local Ray cluster of the tests' own (2 CPUs), even beside one the user started."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
