"""Whole activation patterns of stored regions, recomputed from the checkpoint on demand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from geomstore.store.store import Store

__all__ = ["region_patterns"]


def region_patterns(
    store: Store,
    *,
    partition_id: str,
    net: Any,
    region_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Activation patterns (n, units) of stored regions: stored whole, or recomputed.

    Large models keep only a 128-bit pattern hash per region (see
    :func:`geomstore.partition`'s ``memory``); their patterns are recomputed by running
    ``net`` (the checkpoint's network, checked against the stored weights hash) at an
    interior point of each region, each checked against its stored hash.

    Examples
    --------
    >>> import tempfile, torch, geomstore
    >>> from geomstore.queries import region_patterns
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> part = geomstore.partition(net, geomstore.Slice.box((-1, -1), (1, 1)), device="cpu")
    >>> with geomstore.open(tempfile.mkdtemp()) as store:
    ...     pid = store.add(part, model="toy", checkpoint="init")
    ...     region_patterns(store, partition_id=pid, net=net, region_ids=[0]).shape
    (1, 4)
    """
    part = store.load_partition(partition_id)
    return part.patterns(region_ids, net=net)
