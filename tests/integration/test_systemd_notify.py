"""Both programs speak systemd's notify protocol (the units say Type=notify, WatchdogSec=):
READY=1 once running, WATCHDOG=1 pings from the event loop, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.fleet import SQLITE_STORE, cloud_toml, gateway_toml
from tests.rig import Mosquitto, free_port
from tests.rig.programs import Program, Programs


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(20)
        # The programs inherit the environment, as from systemd.
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
        yield server


def messages_until(server: socket.socket, wanted: str) -> list[str]:
    seen: list[str] = []
    while not any(wanted in m for m in seen):
        seen.append(server.recv(4096).decode())  # socket timeout bounds the wait
    return seen


def check(program: Program, server: socket.socket) -> None:
    seen = messages_until(server, "READY=1")
    assert any(m.startswith("READY=1\nSTATUS=") for m in seen)
    pings = messages_until(server, "WATCHDOG=1")
    assert "WATCHDOG=1" in pings[-1]
    messages_until(server, "WATCHDOG=1")  # and again: a loop, not a single ping
    program.signal(15)
    messages_until(server, "STOPPING=1")
    assert program.stop() == 0


def test_the_cloud_notifies_systemd(
    programs: Programs, mosquitto: Mosquitto, notify_socket: socket.socket, tmp_path: Path
) -> None:
    cloud = programs.cloud(cloud_toml(tmp_path / "cloud", mosquitto.url, SQLITE_STORE)).start()
    check(cloud, notify_socket)


def test_the_gateway_notifies_systemd(
    programs: Programs, mosquitto: Mosquitto, notify_socket: socket.socket, tmp_path: Path
) -> None:
    gateway = programs.gateway(gateway_toml(tmp_path / "gw", free_port(), mosquitto.url, sources="")).start()
    check(gateway, notify_socket)
