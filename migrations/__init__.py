"""Schema migrations of the geomstore store, applied in order (see geomstore.store.schema)."""
