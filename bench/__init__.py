"""Benchmarks: each module prints its figures, the last line the one to quote (``python -m bench.NAME``)."""
