"""geomstore: the exact linear-region geometry of piecewise-linear networks on 2-D slices.

Examples
--------
>>> import torch
>>> import geomstore
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
>>> part = geomstore.partition(net, geomstore.Slice.box((-1, -1), (1, 1)), device="cpu")
>>> part.verify(net).ok
True
"""

from geomstore.client import connect
from geomstore.engine.partition import ENGINE_VERSION, Partition, partition
from geomstore.engine.verify import VerifyReport, verify
from geomstore.errors import (
    GeomstoreError,
    InvalidSliceError,
    ModelShapeError,
    UnsupportedModelError,
)
from geomstore.jobs import compute, submit
from geomstore.loading import ModelLoadError, ModelSpec, load_model
from geomstore.recorder import Recorder
from geomstore.slice import Slice
from geomstore.store import QueryResult, Store
from geomstore.store import open_store as open
from geomstore.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "ENGINE_VERSION",
    "GeomstoreError",
    "InvalidSliceError",
    "ModelLoadError",
    "ModelShapeError",
    "ModelSpec",
    "Partition",
    "QueryResult",
    "Recorder",
    "Slice",
    "Store",
    "UnsupportedModelError",
    "VerifyReport",
    "Worker",
    "__version__",
    "compute",
    "connect",
    "load_model",
    "open",
    "partition",
    "submit",
    "verify",
]
