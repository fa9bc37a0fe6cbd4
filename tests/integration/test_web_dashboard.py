"""The live dashboard page in a real browser: Debian's headless Chromium, driven by Playwright,
loads the page fieldlink-cloud serves while a simulated device's readings flow through a
gateway into the cloud's embedded broker; the page gets them over MQTT-over-WebSocket.

firmware-sim (Modbus TCP) -> fieldlink-gateway -> fieldlink-cloud (embedded amqtt, TCP + WebSocket,
[web] page) -> headless Chromium. One alert is the cloud's own (a rule on the boiler's
temperature ramp), acknowledged through the alert command topic; a few more are published by
the test on the alert topics' contract (`publish_alert`) to check ordering, acknowledgement and
escaping. A screenshot is saved as an artifact.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from cloud.web import STATIC_DIR, VENDOR_BUNDLE
from tests.integration.fleet import GATEWAY, SITE, cloud_ready, gateway_toml, modbus_source, sim_toml
from tests.rig import LOOPBACK, MqttProbe, ci_mode, free_port, require_binary
from tests.rig.programs import Programs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# What works as root on this kind of machine: no sandbox (root), no GPU, and no background
# traffic to Google's hosts (refused by the closed network, many times at every start).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEADLINE_MS = 20_000  # every wait on the page; the values change every 250 ms
BOILER = f"{SITE}/{GATEWAY}/boiler-1"
ALERT_KEY = "boiler-overheat-boiler-1"
NUMBER = re.compile(r"^\d+\.\d\d$")  # how the page shows a float reading


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("FIELDLINK_ARTIFACTS") or REPO / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def publish_alert(broker_port: int, site: str, key: str, alert: dict[str, Any] | None) -> None:
    """Publish an alert the way the alerting engine will (retained, QoS 1; None clears it).

    A stand-in until the engine lands: then drive a real rule over its threshold instead.
    """
    payload = b"" if alert is None else json.dumps(alert).encode()
    mqtt_publish.single(f"dash/{site}/alerts/{key}", payload, qos=1, retain=True, hostname=LOOPBACK, port=broker_port)


def alert_body(state: str, severity: str = "critical", summary: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "id": f"{ALERT_KEY}-1",
        "rule": "boiler-overheat",
        "severity": severity,
        "state": state,
        "site": SITE,
        "gateway": GATEWAY,
        "device": "boiler-1",
        "metric": "temperature",
        "value": 91.5,
        "unit": "degC",
        "threshold": 80.0,
        "summary": summary or "boiler-1 temperature = 91.5 degC > 80",
        "since": "2026-11-27T10:00:00Z",
        "acknowledged_by": None,
        "acknowledged_at": None,
        **extra,
    }


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium under Playwright (never `playwright install`: no browser download here).

    Playwright gives each launch a fresh, empty profile (user data dir) of its own.
    """
    executable = require_binary("chromium", "chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def watch_for_errors(page: Page) -> list[str]:
    """Script errors and console errors (a CSP violation shows there) of ``page``, as they come."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(f"console: {message.text}")

    page.on("console", on_console)
    return errors


def temperature(page: Page) -> str:
    return page.locator(f'[data-device="{BOILER}"] tr[data-metric="temperature"] td.value').inner_text()


def test_the_page_shows_live_values_and_alerts_in_headless_chromium(programs: Programs, tmp_path: Path) -> None:
    if not (STATIC_DIR / VENDOR_BUNDLE).is_file():
        message = f"{STATIC_DIR / VENDOR_BUNDLE} is missing: run `make web` (npm ci + copy of MQTT.js' bundle)"
        if ci_mode():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    modbus_port, local_port, tcp_port, ws_port, web_port = (free_port() for _ in range(5))
    programs.simulator(sim_toml(modbus_port)).start().wait_port(modbus_port)
    cloud = programs.cloud(f"""
[cloud]
name = "cloud-t"
state_dir = "{tmp_path / "cloud"}"
health_interval = "250ms"
[broker]
embedded = true
bind = "127.0.0.1:{tcp_port}"
ws_bind = "127.0.0.1:{ws_port}"
[store]
kind = "sqlite"
[web]
enabled = true
bind = "127.0.0.1:{web_port}"
[[rules]]
name = "overheat"
metric = "temperature"
above = 80.0
clear = 60.0  # below the ramp's minimum: once fired it stays, so the page can be checked at leisure
severity = "major"
""")
    gateway = programs.gateway(
        gateway_toml(
            tmp_path / "gateway", local_port, f"mqtt://127.0.0.1:{tcp_port}", modbus_source("line", modbus_port)
        )
    )
    cloud.start().wait_port(web_port)
    with MqttProbe(LOOPBACK, tcp_port, ["fl-cloud/#"]) as probe:
        cloud_ready(probe)
    gateway.start().wait_port(local_port)
    assert f"dashboard page at http://127.0.0.1:{web_port}/" in cloud.log()

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = watch_for_errors(page)
        page.goto(f"http://127.0.0.1:{web_port}/")
        expect(page.locator("#connection")).to_have_attribute("data-state", "connected", timeout=DEADLINE_MS)

        # The device with a value and its unit, then the value changing (the ramp climbs 5 degC/s).
        boiler = page.locator(f'[data-device="{BOILER}"]')
        row = boiler.locator('tr[data-metric="temperature"]')
        expect(row.locator("td.value")).to_have_text(NUMBER, timeout=DEADLINE_MS)
        expect(row.locator("td.unit")).to_have_text("degC")
        expect(boiler.locator('tr[data-metric="pressure"] td.unit')).to_have_text("bar")
        expect(boiler.locator(".updated")).to_contain_text("updated ")
        first = temperature(page)
        expect(row.locator("td.value")).not_to_have_text(first, timeout=DEADLINE_MS)
        # Online state, as the gateway reported it for itself and its devices.
        expect(page.locator(f'[data-gateway="{SITE}/{GATEWAY}"]')).to_have_attribute("data-state", "online")
        expect(boiler).to_have_attribute("data-state", "online", timeout=DEADLINE_MS)
        expect(page.locator(f'[data-device="{SITE}/{GATEWAY}/meter-1"] tr[data-metric="power"] td.unit')).to_have_text(
            "kW"
        )
        # The cloud's own alert: the ramp crosses 80 degC within seconds.
        real = page.locator(f'#alerts li[data-alert="{SITE}/overheat:{SITE}:{GATEWAY}:boiler-1"]')
        expect(real).to_have_attribute("data-state", "firing", timeout=DEADLINE_MS)
        expect(real.locator(".summary")).to_contain_text(f"overheat: {BOILER} temperature = ")
        ack = {"id": f"overheat:{SITE}:{GATEWAY}:boiler-1", "by": "ops-oncall"}
        mqtt_publish.single("fl-cloud/alerts/ack", json.dumps(ack), qos=1, hostname=LOOPBACK, port=tcp_port)
        expect(real.locator(".ack")).to_have_text("acknowledged by ops-oncall", timeout=DEADLINE_MS)
        # Only dashboard topics make it onto the page (amqtt also hands out others' retained messages).
        expect(page.locator("#sites > section.site")).to_have_count(1)
        expect(page.locator(f'section.site[data-site="{SITE}"] h2')).to_contain_text("2/2 devices online")

        # A firing alert appears; data shows as text, never as markup.
        summary = "boiler-1 temperature = 91.5 degC > 80 <b>hot</b>"
        publish_alert(tcp_port, SITE, ALERT_KEY, alert_body("firing", summary=summary))
        publish_alert(
            tcp_port,
            SITE,
            "low-pressure-boiler-1",
            alert_body("pending", "warning", "boiler-1 pressure low", rule="low-pressure", acknowledged_by="dana"),
        )
        alerts = page.locator("#alerts li")
        expect(alerts).to_have_count(3, timeout=DEADLINE_MS)
        firing = page.locator(f'#alerts li[data-alert="{SITE}/{ALERT_KEY}"]')
        expect(alerts.first).to_have_attribute("data-alert", f"{SITE}/{ALERT_KEY}")  # firing first
        expect(firing).to_have_attribute("data-state", "firing")
        expect(firing.locator(".summary")).to_have_text(summary)
        expect(firing.locator("b")).to_have_count(0)
        expect(alerts.nth(1)).to_have_attribute("data-alert", real.get_attribute("data-alert") or "")  # then major
        expect(alerts.nth(2).locator(".ack")).to_have_text("acknowledged by dana")
        expect(page.locator("#alert-count")).to_have_text("3")
        expect(page.locator("#no-alerts")).to_be_hidden()
        shot = artifacts_dir() / "web-dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")

        # Retained: a page loaded now gets the same state at once.
        page.reload()
        expect(page.locator("#alerts li")).to_have_count(3, timeout=DEADLINE_MS)
        expect(row.locator("td.value")).to_have_text(NUMBER, timeout=DEADLINE_MS)

        # Resolved, and cleared (empty retained payload): both leave the panel.
        publish_alert(tcp_port, SITE, ALERT_KEY, alert_body("resolved"))
        expect(firing).to_have_count(0, timeout=DEADLINE_MS)
        publish_alert(tcp_port, SITE, "low-pressure-boiler-1", None)
        expect(alerts).to_have_count(1, timeout=DEADLINE_MS)  # the cloud's own, still firing
        expect(alerts.first.locator(".ack")).to_have_text("acknowledged by ops-oncall")
        assert errors == []

        # Without the MQTT.js bundle the page still loads and says what to do.
        broken = browser.new_page()
        broken.route("**/vendor/mqtt.min.js", lambda route: route.fulfill(status=404, body="missing"))
        broken.goto(f"http://127.0.0.1:{web_port}/")
        expect(broken.locator("#error")).to_contain_text("run `make web`", timeout=DEADLINE_MS)
        expect(broken.locator("#connection")).to_have_attribute("data-state", "error")

    assert gateway.stop() == 0
    assert cloud.stop() == 0
