"""InfluxDB 2.x / 3.x / Cloud through the v2 write API (``POST /api/v2/write``).

The store writes line protocol itself (``influxdb_http.py``: the request influxdb-client
sends, on the event loop instead of a thread) and formats lines with templates per record
shape (``line_protocol.py``). ``prepare`` and ``write_prepared`` split the work so the ingest
pipeline formats a round while the previous one is being written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from cloud.stores.base import StoreRejected, StoreUnavailable
from cloud.stores.influxdb_http import WriteEndpoint, WriteFailed
from cloud.stores.line_protocol import Identity, LineFormatter, LineMapping
from cloud.stores.registry import register_store
from fieldlink.configkit import Duration, Schema
from fieldlink.wire import Record, ScannedRecord

__all__ = ["InfluxDBConfig", "InfluxDBStore"]

log = logging.getLogger(__name__)


# Answers that mean "this data is wrong": malformed line, field type conflict, too large.
_BAD_DATA = frozenset({400, 413, 422})


class InfluxDBConfig(Schema):
    kind: Literal["influxdb"]
    url: str  # http:// or https://, with a path prefix if InfluxDB is behind one
    org: str = "fieldlink"
    bucket: str = "fieldlink"
    token: SecretStr = SecretStr("")
    measurement: str = Field(default="fieldlink", min_length=1)
    # Which identity levels are tags (device is required: without it devices would share points).
    tags: list[Identity] = Field(default_factory=lambda: ["site", "gateway", "device"])
    units: Literal["none", "tag", "field"] = "none"
    precision: Literal["s", "ms", "us", "ns"] = "ms"
    batch_max_points: int = Field(default=5000, ge=1)  # lines per HTTP write
    timeout: Duration = 10.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            raise ValueError(f"has an invalid port, got {url!r}") from None
        return url

    @field_validator("tags")
    @classmethod
    def _device_is_a_tag(cls, tags: list[str]) -> list[str]:
        if "device" not in tags:
            raise ValueError("must include 'device': points of different devices would overwrite each other")
        if len(set(tags)) < len(tags):
            raise ValueError(f"lists a tag twice: {tags}")
        return tags

    @property
    def mapping(self) -> LineMapping:
        return LineMapping(self.measurement, tuple(self.tags), self.units, self.precision)


class InfluxDBStore:
    name = "influxdb"

    def __init__(self, config: InfluxDBConfig, _cloud_config: Any = None) -> None:
        self.config = config
        self._formatter = LineFormatter(config.mapping)
        self._endpoint: WriteEndpoint | None = None

    async def open(self) -> None:
        self._endpoint = WriteEndpoint(
            self.config.url,
            org=self.config.org,
            bucket=self.config.bucket,
            token=self.config.token.get_secret_value(),
            precision=self.config.precision,
            timeout=self.config.timeout,
        )
        log.info("influxdb store", extra={"url": self.config.url, "bucket": self.config.bucket})

    def prepare(self, records: Sequence[Record | ScannedRecord]) -> list[str]:
        """Per record, in order: its line protocol ('' for a record without a good value)."""
        return self._formatter.lines(records)

    async def write(self, records: Sequence[Record | ScannedRecord]) -> None:
        await self.write_prepared(self._formatter.lines(records))

    async def write_prepared(self, prepared: Sequence[str]) -> None:
        """Write what ``prepare`` made: ``batch_max_points`` lines per request, one request at a time."""
        step = self.config.batch_max_points
        texts = [text for text in prepared if text]
        if self.config.units != "tag":  # a line per record
            chunks = [texts[start : start + step] for start in range(0, len(texts), step)]
        else:  # a line per value: a record's lines stay in one request
            chunks, chunk, lines = [], [], 0
            for text in texts:
                chunk.append(text)
                lines += text.count("\n") + 1
                if lines >= step:
                    chunks.append(chunk)
                    chunk, lines = [], 0
            if chunk:
                chunks.append(chunk)
        for chunk in chunks:
            await self._post("\n".join(chunk).encode())

    async def _post(self, body: bytes) -> None:
        if self._endpoint is None:
            raise StoreUnavailable("InfluxDB store is not open")
        try:
            answer = await self._endpoint.post(body)
        except WriteFailed as exc:
            raise StoreUnavailable(f"InfluxDB unreachable: {exc}") from None
        if 200 <= answer.status < 300:
            return
        if answer.status in _BAD_DATA:
            raise StoreRejected(f"InfluxDB refused the write ({answer.status}): {answer.body or answer.reason}")
        # 401/403/404 (token, org, bucket) are configuration problems: keep the data and retry
        # until an operator fixes them, as for 429 and 5xx.
        retry_after = _retry_after(answer.headers.get("retry-after"))
        raise StoreUnavailable(f"InfluxDB answered {answer.status}: {answer.reason}", retry_after)

    async def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None


def _retry_after(header: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date (RFC 9110)."""
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


register_store("influxdb", InfluxDBConfig, InfluxDBStore)
