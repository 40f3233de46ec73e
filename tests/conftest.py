from __future__ import annotations

import duckdb
import torch


def pytest_report_header(config: object) -> list[str]:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return [f"geomstore: torch {torch.__version__}, duckdb {duckdb.__version__}, device {dev}"]
