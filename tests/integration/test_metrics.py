"""Prometheus /metrics on both programs, scraped over HTTP during a run with real devices."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.integration.fleet import SQLITE_STORE, cloud_toml, gateway_toml, modbus_source, sim_toml
from tests.rig import Mosquitto, free_port
from tests.rig.programs import Programs

T = TypeVar("T")


def poll_until(probe: Callable[[], T | None], timeout: float) -> T:
    """Call ``probe`` until it returns something truthy (metrics refresh every health_interval)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s")
        time.sleep(0.1)  # polling an HTTP endpoint with a deadline, not synchronising


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_gateway_and_cloud_serve_prometheus_metrics(programs: Programs, mosquitto: Mosquitto, tmp_path: Path) -> None:
    modbus_port, local_port, gw_metrics, cloud_metrics = free_port(), free_port(), free_port(), free_port()
    programs.simulator(sim_toml(modbus_port)).start().wait_port(modbus_port)
    metrics = lambda port: f'[metrics]\nbind = "127.0.0.1:{port}"\n'  # noqa: E731
    cloud = programs.cloud(cloud_toml(tmp_path / "cloud", mosquitto.url, SQLITE_STORE) + metrics(cloud_metrics))
    cloud.start().wait_port(cloud_metrics)
    config = gateway_toml(tmp_path / "gw", local_port, mosquitto.url, modbus_source("line", modbus_port, "100ms"))
    gateway = programs.gateway(config + metrics(gw_metrics))
    gateway.start().wait_port(gw_metrics)

    def gateway_ready() -> dict[str, float] | None:
        samples = _scrape(gw_metrics)
        key = 'fieldlink_modbus_requests_total{device="boiler-1",source="line"}'
        return (
            samples if samples.get(key, 0) > 0 and samples.get("fieldlink_gateway_records_delivered_total", 0) else None
        )

    samples = poll_until(gateway_ready, timeout=20)
    assert samples['fieldlink_device_state{device="boiler-1"}'] == 2  # online
    assert samples["fieldlink_gateway_uplink_connected"] == 1
    assert samples['fieldlink_gateway_drops_total{reason="max_bytes"}'] == 0
    assert 'fieldlink_modbus_latency_seconds{device="boiler-1",quantile="0.99",source="line"}' in samples

    cloud_samples = poll_until(
        lambda: (s := _scrape(cloud_metrics)).get("fieldlink_cloud_records_stored_total") and s, 20
    )
    assert cloud_samples["fieldlink_cloud_broker_connected"] == 1
    assert cloud_samples["fieldlink_cloud_dead_letters_total"] == 0
    assert cloud_samples["fieldlink_cloud_spool_records"] == 0
    assert gateway.stop() == 0
    assert cloud.stop() == 0
