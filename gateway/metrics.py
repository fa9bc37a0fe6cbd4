"""The gateway's health report as Prometheus metrics (served by fieldlink.metrics)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fieldlink.metrics import Family, counter, gauge

__all__ = ["gateway_metrics"]

_STATES = {"online": 2, "degraded": 1, "offline": 0}
_MODBUS_COUNTERS = ("requests", "responses", "timeouts", "connect_failures", "crc_errors", "writes", "write_errors")


def gateway_metrics(h: dict[str, Any]) -> Iterator[Family]:
    buffer, uplink = h.get("buffer", {}), h.get("uplink", {})
    yield counter("fieldlink_gateway_readings", "Polls of the gateway's sources, buffered", h.get("readings_published"))
    yield counter("fieldlink_gateway_records_buffered", "Telemetry records into the buffer", h.get("records_buffered"))
    yield counter(
        "fieldlink_gateway_records_delivered", "Records the cloud broker acknowledged", h.get("records_delivered")
    )
    yield counter("fieldlink_gateway_readings_dropped", "Readings the buffer could not take", h.get("readings_dropped"))
    yield gauge("fieldlink_gateway_buffer_messages", "Messages waiting in the buffer", buffer.get("messages"))
    yield gauge("fieldlink_gateway_buffer_bytes", "Topic + payload bytes in the buffer", buffer.get("bytes"))
    yield gauge("fieldlink_gateway_buffer_max_bytes", "The buffer's max_bytes", buffer.get("max_bytes"))
    yield gauge(
        "fieldlink_gateway_buffer_oldest_age_seconds", "Age of the oldest buffered message", buffer.get("oldest_age_s")
    )
    drops = counter("fieldlink_gateway_drops", "Messages lost, by reason", None, {"reason": ""})
    for reason, count in h.get("drops", {}).items():
        drops.add_metric([reason], count)
    yield drops
    yield gauge(
        "fieldlink_gateway_uplink_connected", "1 while the uplink is connected", int(uplink.get("state") == "connected")
    )
    yield gauge("fieldlink_gateway_uplink_inflight", "Messages sent, not acknowledged yet", uplink.get("inflight"))
    yield gauge(
        "fieldlink_gateway_replay_lag_seconds", "Age of the backlog record sent last", uplink.get("replay_lag_s")
    )
    yield counter("fieldlink_gateway_uplink_dead_links", "Links dropped for a missing PUBACK", uplink.get("dead_links"))
    commands = h.get("commands", {})
    yield counter("fieldlink_gateway_commands_executed", "Device writes that succeeded", commands.get("executed"))
    yield counter("fieldlink_gateway_commands_failed", "Device writes that failed", commands.get("failed"))
    states = gauge("fieldlink_device_state", "Device state: 2 online, 1 degraded, 0 offline", None, {"device": ""})
    for device, state in h.get("devices", {}).items():
        states.add_metric([device], _STATES.get(state, 0))
    yield states
    yield from _source_metrics(h.get("sources", {}))


def _source_metrics(sources: dict[str, Any]) -> Iterator[Family]:
    labels = {"source": "", "device": ""}
    totals = {
        name: counter(f"fieldlink_modbus_{name}", f"Modbus {name.replace('_', ' ')}", None, labels)
        for name in _MODBUS_COUNTERS
    }
    exceptions = counter(
        "fieldlink_modbus_exceptions", "Modbus exception answers, by code", None, {**labels, "code": ""}
    )
    latency = gauge("fieldlink_modbus_latency_seconds", "Request latency on the wire", None, {**labels, "quantile": ""})
    serial = counter("fieldlink_serial", "Serial source counters, by name", None, {"source": "", "counter": ""})
    for source, stats in sources.items():
        devices = stats.get("devices")
        if not isinstance(devices, dict):  # a serial source: flat counters
            for name, value in stats.items():
                if isinstance(value, int | float):
                    serial.add_metric([source, name], value)
            continue
        for device, d in devices.items():
            for name, family in totals.items():
                family.add_metric([source, device], d.get(name, 0))
            for code, count in d.get("exceptions", {}).items():
                exceptions.add_metric([source, device, code], count)
            for quantile, key in (("0.5", "p50"), ("0.99", "p99")):
                value = d.get("latency_ms", {}).get(key)
                if value is not None:
                    latency.add_metric([source, device, quantile], value / 1000)
    yield from totals.values()
    yield exceptions
    yield latency
    yield serial
