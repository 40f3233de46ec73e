"""Queries over stored partitions: local complexity, statistics, boundary sampling."""

from geomstore.queries.boundary import sample_boundary
from geomstore.queries.complexity import local_complexity
from geomstore.queries.stats import partition_stats, resolve_partitions

__all__ = ["local_complexity", "partition_stats", "resolve_partitions", "sample_boundary"]
