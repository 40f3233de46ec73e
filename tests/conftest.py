from __future__ import annotations

from collections.abc import Iterator

import duckdb
import pytest
import torch


def pytest_report_header(config: object) -> list[str]:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return [f"geomstore: torch {torch.__version__}, duckdb {duckdb.__version__}, device {dev}"]


@pytest.fixture(autouse=True)
def _fresh_lowering_cache() -> Iterator[None]:
    """Each test starts with no cached lowered graphs: a test that patches the lowering
    sees it run, whatever models earlier tests traced."""
    from geomstore.engine.lower import CACHE

    CACHE.clear()
    yield
