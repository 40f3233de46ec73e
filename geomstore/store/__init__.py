"""The geometry store (DuckDB + spatial + DuckLake)."""

from geomstore.store.store import QueryResult, Store, open_store

__all__ = ["QueryResult", "Store", "open_store"]
