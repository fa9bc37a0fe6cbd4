"""Grep-able logs: one line per event, ``key=value`` (default) or JSON.

Call sites pass facts as ``extra``; the formatter renders every non-standard
attribute of the record as a field::

    log.warning("device offline", extra={"device": "boiler-1", "reason": "timeout"})
    ts=2026-11-26T20:27:14.123Z level=warning logger=gateway.sources msg="device offline"
      device=boiler-1 reason=timeout   (one line in the log)

Secrets never reach a log line: config values that hold them are ``SecretStr`` and
render as ``**********``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

__all__ = ["LogFormat", "setup_logging"]

LogFormat = Literal["kv", "json"]

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _kv_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={_timestamp(record)}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_kv_value(record.getMessage())}",
        ]
        parts += [f"{k}={_kv_value(v)}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append(f"exc={_kv_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        body.update(_fields(record))
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: LogFormat = "kv") -> None:
    """Configure the root logger once per process, writing to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party libraries are chatty at INFO (amqtt logs every connection); our own
    # loggers report what matters for operators. (pymodbus is silenced by its adapter.)
    # influxdb-client and urllib3 would log request headers (the token) at DEBUG.
    for noisy in ("amqtt", "transitions", "asyncio", "aiosmtpd", "mail.log", "influxdb_client", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.getLogger("amqtt.broker").addFilter(_drop_port_probes)


def _drop_port_probes(record: logging.LogRecord) -> bool:
    # amqtt logs an ERROR for every TCP connection closed before sending a packet:
    # port checks of monitoring, systemd and test rigs. It is not an error of ours.
    return "No data to decode MQTT packet fixed header" not in record.getMessage()
