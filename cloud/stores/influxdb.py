"""InfluxDB 2.x / 3.x / Cloud through the v2 write API: the only module importing influxdb-client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException
from pydantic import SecretStr
from urllib3.exceptions import HTTPError

from cloud.stores.base import StoreRejected, StoreUnavailable
from cloud.stores.line_protocol import format_record
from cloud.stores.registry import register_store
from fieldlink.configkit import Duration, Schema
from fieldlink.wire import Record

__all__ = ["InfluxDBConfig", "InfluxDBStore"]

log = logging.getLogger(__name__)


# Answers that mean "this data is wrong": malformed line, field type conflict, too large.
_BAD_DATA = frozenset({400, 413, 422})


class InfluxDBConfig(Schema):
    kind: Literal["influxdb"]
    url: str
    org: str = "fieldlink"
    bucket: str = "fieldlink"
    token: SecretStr = SecretStr("")
    measurement: str = "fieldlink"
    timeout: Duration = 10.0


class InfluxDBStore:
    name = "influxdb"

    def __init__(self, config: InfluxDBConfig, _cloud_config: Any = None) -> None:
        self.config = config
        self._client: InfluxDBClient | None = None
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
        lines = [line for r in records if (line := format_record(r, self.config.measurement)) is not None]
        if lines:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._write_lines, lines)

    def _write_lines(self, lines: list[str]) -> None:
        try:
            self._write_api.write(
                bucket=self.config.bucket,
                org=self.config.org,
                record=lines,
                write_precision=WritePrecision.MS,
            )
        except ApiException as exc:
            if exc.status in _BAD_DATA:
                raise StoreRejected(f"InfluxDB refused the write ({exc.status}): {exc.body or exc.reason}") from None
            # 401/403/404 (token, org, bucket) are configuration problems: keep the data and retry
            # until an operator fixes them, as for 429 and 5xx.
            retry_after = None
            if exc.headers and exc.headers.get("Retry-After", "").isdigit():
                retry_after = float(exc.headers["Retry-After"])
            raise StoreUnavailable(f"InfluxDB answered {exc.status}: {exc.reason}", retry_after) from None
        except (HTTPError, OSError) as exc:
            raise StoreUnavailable(f"InfluxDB unreachable: {exc}") from None

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._thread.shutdown(wait=False)


register_store("influxdb", InfluxDBConfig, InfluxDBStore)
