"""Prometheus ``/metrics`` for both programs, served from their latest health report.

Each program already builds a health report (JSON on its health topic); the exporter
keeps the latest one and turns it into metric families when Prometheus scrapes, so
there is one source of truth for every counter. prometheus-client serves the page
from its own thread; the report is replaced whole, never mutated, so a scrape always
sees one consistent report. Figures are as fresh as the program's health_interval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Family", "MetricsExporter", "counter", "gauge"]

log = logging.getLogger(__name__)

Family = CounterMetricFamily | GaugeMetricFamily
Describe = Callable[[dict[str, Any]], Iterable[Family]]


def counter(name: str, help_text: str, value: Any, labels: dict[str, str] | None = None) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=list(labels or {}))
    if isinstance(value, int | float) and not isinstance(value, bool):
        family.add_metric(list((labels or {}).values()), value)
    return family


def gauge(name: str, help_text: str, value: Any, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=list(labels or {}))
    if isinstance(value, int | float) and not isinstance(value, bool):
        family.add_metric(list((labels or {}).values()), value)
    return family


class MetricsExporter(Collector):
    def __init__(self, describe: Describe) -> None:
        self._describe = describe
        self.report: dict[str, Any] = {}
        self._server: Any = None

    def collect(self) -> Iterator[Family]:
        report = self.report
        if report:
            yield from self._describe(report)

    def start(self, bind: str) -> None:
        """Serve /metrics on ``HOST:PORT`` (a port of 0 picks a free one)."""
        host, _, port = bind.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        try:
            self._server, _ = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
        except OSError as exc:
            # Metrics are a view: a taken port must not stop data from flowing.
            reason = exc.strerror or str(exc)
            log.error("metrics cannot listen; running without", extra={"bind": bind, "reason": reason})
            return
        log.info("metrics listening", extra={"bind": bind, "path": "/metrics"})

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
