"""The systemd notify protocol against a real AF_UNIX datagram socket, as systemd listens."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fieldlink import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield server


def test_ready_and_status_reach_the_socket(notify_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1", "STATUS=cloud running")
    assert notify_socket.recv(1024) == b"READY=1\nSTATUS=cloud running"


def test_without_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_the_watchdog_pings_at_half_its_interval(notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 0.1

    async def two_pings() -> list[bytes]:
        task = asyncio.create_task(sdnotify.watchdog_loop())
        loop = asyncio.get_running_loop()
        pings = [await loop.run_in_executor(None, notify_socket.recv, 64) for _ in range(2)]
        task.cancel()
        return pings

    assert asyncio.run(two_pings()) == [b"WATCHDOG=1", b"WATCHDOG=1"]


def test_a_watchdog_meant_for_another_process_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sdnotify.watchdog_interval() is None
    asyncio.run(asyncio.wait_for(sdnotify.watchdog_loop(), 1))  # returns at once
