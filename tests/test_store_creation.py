"""Making a store: a data path in a bucket that cannot be listed is refused before the
catalog records it, and nothing of the store is left behind, so a retry with the right
bucket starts afresh."""

from __future__ import annotations

from pathlib import Path

import pytest

import geomstore
from geomstore.errors import StoreError
from tests.nets import BOX, mlp
from tests.s3server import S3Server
from tests.test_objectstore import aws, server

__all__ = ["aws", "server"]  # the S3 fixtures, shared with test_objectstore


def test_a_mistyped_bucket_leaves_no_store_behind(aws: S3Server, tmp_path: Path) -> None:
    bucket = aws.bucket()
    target = tmp_path / "store"
    with pytest.raises(StoreError, match="cannot list the data path s3://no-such-bukket/p/"):
        geomstore.open(target, data_path="s3://no-such-bukket/p/")
    assert not target.exists()
    part = geomstore.partition(mlp((6,), 2), BOX, device="cpu")
    with geomstore.open(target, data_path=f"s3://{bucket}/p/") as store:
        store.add(part, model="m", checkpoint="c")
    with geomstore.open(target, read_only=True) as store:
        assert store.data_path == f"s3://{bucket}/p/"
        assert store.partitions().num_rows == 1
    assert any(k.startswith("p/") for k in aws.keys(bucket))


def test_a_failed_new_store_in_an_existing_folder_leaves_the_folder_as_it_was(
    aws: S3Server, tmp_path: Path
) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    with pytest.raises(StoreError, match="cannot list"):
        geomstore.open(target, data_path="s3://no-such-bukket/p/")
    assert target.is_dir() and not any(target.iterdir())
