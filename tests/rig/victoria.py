"""A private victoria-metrics instance: the InfluxDB-API time-series store of the tests."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.rig.ports import LOOPBACK, POLL_INTERVAL, free_port
from tests.rig.servers import ensure_port_free, kill_process, require_binary, spawn, stop_process, wait_ready

Series = dict[str, Any]


def sample_count(series: list[Series]) -> int:
    """Total number of samples across exported series."""
    return sum(len(s["values"]) for s in series)


class VictoriaMetrics:
    """`victoria-metrics` on a loopback port, with helpers to read back what was written."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        retention: str = "100y",
        extra_args: list[str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        # The default retention (1 month) silently drops older samples: the
        # write still answers 204 and only a warning lands in the log. Tests use
        # fixed timestamps (e.g. 1700000000000, in 2023), so keep everything.
        self.retention = retention
        self.extra_args = extra_args or []
        self.start_timeout = start_timeout
        self.data_dir = workdir / "data"
        self.log_path = workdir / "victoria-metrics.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start victoria-metrics; return when `GET /health` answers OK."""
        if self.running:
            raise RuntimeError(f"victoria-metrics on port {self.port} is already running")
        binary = require_binary("victoria-metrics", "victoria-metrics")
        self.workdir.mkdir(parents=True, exist_ok=True)
        ensure_port_free("victoria-metrics", self.port, self.log_path)
        argv = [
            binary,
            f"-storageDataPath={self.data_dir}",
            f"-httpListenAddr={LOOPBACK}:{self.port}",
            f"-retentionPeriod={self.retention}",
            # -dedup.minScrapeInterval is deliberately NOT set: if our code writes
            # a sample twice, the tests must see both copies in the export.
            *self.extra_args,
        ]
        self._proc = spawn(argv, self.log_path)
        wait_ready("victoria-metrics", self._proc, self._healthy, self.log_path, self.start_timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait: victoria-metrics flushes its in-memory data on the way out."""
        if self._proc is None:
            return None
        code = stop_process(self._proc, timeout)
        self._proc = None
        return code

    def kill(self) -> int | None:
        """SIGKILL: a crash, losing what was not flushed yet."""
        if self._proc is None:
            return None
        code = kill_process(self._proc)
        self._proc = None
        return code

    def _get(self, path: str, query: dict[str, str] | None = None, timeout: float = 5.0) -> bytes:
        url = f"{self.url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (our own http URL)
            body: bytes = response.read()
            return body

    def _healthy(self) -> bool:
        try:
            return self._get("/health", timeout=0.5).strip() == b"OK"
        except (OSError, urllib.error.URLError):
            return False

    def force_flush(self) -> None:
        """Make recently written samples searchable (they sit in memory for up to a second)."""
        self._get("/internal/force_flush")

    def export(self, match: str) -> list[Series]:
        """All series matching the selector, e.g. `{__name__=~"m_.*"}`, one dict per series.

        `match[]` must be in the query string: sent as a POST form body it
        returned nothing on 1.79.
        """
        body = self._get("/api/v1/export", {"match[]": match})
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def wait_for_samples(self, match: str, count: int, timeout: float = 10.0) -> list[Series]:
        """Flush and poll the export until it holds at least `count` samples; return the series.

        Right after a flush the export can still be empty, hence the polling.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.force_flush()
            series = self.export(match)
            if sample_count(series) >= count:
                return series
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"victoria-metrics: {sample_count(series)} of {count} samples for {match} "
                    f"after {timeout:.1f} s; series: {[s['metric'] for s in series]}; log {self.log_path}"
                )
            time.sleep(POLL_INTERVAL)

    def __repr__(self) -> str:
        return f"VictoriaMetrics(port={self.port}, running={self.running}, log={self.log_path})"
