"""Queries over stored partitions: local complexity, statistics, boundary sampling."""

from geomstore.client import remote_aware
from geomstore.queries.agreement import CompareArgumentError, agreement
from geomstore.queries.approx import approximate_lc
from geomstore.queries.boundary import NoBoundaryError, sample_boundary
from geomstore.queries.catalog import (
    checkpoints,
    dataset_points,
    datasets,
    models,
    partitions,
    slices,
)
from geomstore.queries.complexity import local_complexity
from geomstore.queries.fragmentation import fragmentation
from geomstore.queries.migration import migration_index
from geomstore.queries.patterns import region_patterns
from geomstore.queries.points import churn, point_regions
from geomstore.queries.stats import partition_stats, resolve_partitions
from geomstore.queries.stored import agreement_over, boundary_samples, fragmentation_over
from geomstore.queries.trajectory import lc_trajectory, turning_points

# A geomstore.connect(...) client as the store: these run on the service (same tables).
local_complexity = remote_aware(local_complexity)
lc_trajectory = remote_aware(lc_trajectory)
partition_stats = remote_aware(partition_stats)
boundary_samples = remote_aware(boundary_samples)
agreement_over = remote_aware(agreement_over)
churn = remote_aware(churn)
point_regions = remote_aware(point_regions)

__all__ = [
    "CompareArgumentError",
    "NoBoundaryError",
    "agreement",
    "agreement_over",
    "approximate_lc",
    "boundary_samples",
    "checkpoints",
    "churn",
    "dataset_points",
    "datasets",
    "fragmentation",
    "fragmentation_over",
    "lc_trajectory",
    "local_complexity",
    "migration_index",
    "models",
    "partition_stats",
    "partitions",
    "point_regions",
    "region_patterns",
    "resolve_partitions",
    "sample_boundary",
    "slices",
    "turning_points",
]
