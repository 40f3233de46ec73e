"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1 (no mocks).

``s3_server()`` starts ``moto_server`` on a free loopback port, waits (bounded) until it
answers, yields an :class:`S3Server`, and kills it at the end. ``env()`` gives the standard
AWS variables geomstore reads, with a planted secret key that tests look for in every
output to check that it never comes back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """A running moto S3 server and the (fake, but secret) credentials to reach it."""

    port: int
    key_id: str = "AKIAGEOMSTORETEST"
    secret: str = field(default_factory=lambda: f"planted-secret-{uuid.uuid4().hex}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The AWS environment variables that point geomstore at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": "us-east-1",
            "GEOMSTORE_S3_ENDPOINT": self.endpoint,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )

    def bucket(self, name: str | None = None) -> str:
        """Create a fresh bucket; returns its name."""
        name = name or f"gs-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        """Every object key in a bucket."""
        out: list[str] = []
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for page in pages:
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def read_all(self, bucket: str) -> bytes:
        """All objects' bytes, concatenated (to look for leaked secrets)."""
        c = self.client()
        keys = self.keys(bucket)
        return b"".join(c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys)


@contextmanager
def s3_server(timeout: float = 30.0) -> Iterator[S3Server]:
    """Start ``moto_server`` on 127.0.0.1; skip the test when moto is not installed."""
    import pytest

    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    try:
        import moto  # noqa: F401
    except ImportError:
        pytest.skip("moto[server] is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        end = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1.0):
                    break
            except OSError:
                if time.monotonic() > end:
                    raise RuntimeError(f"moto_server did not answer within {timeout} s") from None
                time.sleep(0.1)
        yield S3Server(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
