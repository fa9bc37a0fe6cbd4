"""Imports every built-in store so that each registers itself."""

from cloud.stores import influxdb, sqlite  # noqa: F401
