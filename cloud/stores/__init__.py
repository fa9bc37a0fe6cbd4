"""Time-series stores. Each kind registers itself in :mod:`cloud.stores.registry`."""
