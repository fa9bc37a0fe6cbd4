"""Field sources: each kind is a plugin registered in :mod:`gateway.sources.registry`."""
