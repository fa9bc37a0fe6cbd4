"""InfluxDB 2.x / 3.x / Cloud through the v2 write API: the only module importing influxdb-client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException
from pydantic import Field, SecretStr, field_validator
from urllib3.exceptions import HTTPError

from cloud.stores.base import StoreRejected, StoreUnavailable
from cloud.stores.line_protocol import Identity, LineMapping, format_lines
from cloud.stores.registry import register_store
from fieldlink.configkit import Duration, Schema
from fieldlink.wire import Record

__all__ = ["InfluxDBConfig", "InfluxDBStore"]

log = logging.getLogger(__name__)


# Answers that mean "this data is wrong": malformed line, field type conflict, too large.
_BAD_DATA = frozenset({400, 413, 422})
_PRECISION = {"s": WritePrecision.S, "ms": WritePrecision.MS, "us": WritePrecision.US, "ns": WritePrecision.NS}


class InfluxDBConfig(Schema):
    kind: Literal["influxdb"]
    url: str
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
        self._client: InfluxDBClient | None = None
        self._mapping = config.mapping
        self._precision = _PRECISION[config.precision]
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="influxdb")

    async def open(self) -> None:
        self._client = InfluxDBClient(
            url=self.config.url,
            token=self.config.token.get_secret_value(),
            org=self.config.org,
            timeout=int(self.config.timeout * 1000),
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        log.info("influxdb store", extra={"url": self.config.url, "bucket": self.config.bucket})

    async def write(self, records: Sequence[Record]) -> None:
        mapping = self._mapping
        lines = [line for r in records for line in format_lines(r, mapping)]
        if lines:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._write_lines, lines)

    def _write_lines(self, lines: list[str]) -> None:
        step = self.config.batch_max_points
        for start in range(0, len(lines), step):
            self._write_chunk(lines[start : start + step])

    def _write_chunk(self, lines: list[str]) -> None:
        try:
            self._write_api.write(
                bucket=self.config.bucket,
                org=self.config.org,
                record=lines,
                write_precision=self._precision,
            )
        except ApiException as exc:
            if exc.status in _BAD_DATA:
                raise StoreRejected(f"InfluxDB refused the write ({exc.status}): {exc.body or exc.reason}") from None
            # 401/403/404 (token, org, bucket) are configuration problems: keep the data and retry
            # until an operator fixes them, as for 429 and 5xx.
            retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            raise StoreUnavailable(f"InfluxDB answered {exc.status}: {exc.reason}", retry_after) from None
        except (HTTPError, OSError) as exc:
            raise StoreUnavailable(f"InfluxDB unreachable: {exc}") from None

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._thread.shutdown(wait=False)


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
