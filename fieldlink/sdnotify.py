"""systemd's notify protocol, without a dependency: readiness, reload, stop and the watchdog.

With ``Type=notify`` systemd waits for ``READY=1`` before it calls the service started,
and with ``WatchdogSec=`` it restarts a service that stops sending ``WATCHDOG=1``: the
pings come from a task on the event loop, so a loop that hangs (a blocking call, a
deadlock) is restarted, not left running deaf. Outside systemd (no ``NOTIFY_SOCKET``)
every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

__all__ = ["notify", "watchdog_interval", "watchdog_loop"]

log = logging.getLogger(__name__)


def notify(*states: str) -> bool:
    """Send ``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``WATCHDOG=1``, ``STATUS=...``; False if not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode(), address)
    except OSError as exc:
        log.warning("systemd notification failed", extra={"socket": address, "error": str(exc)})
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds (systemd's advice), if the watchdog is on for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def watchdog_loop() -> None:
    """Ping the watchdog until cancelled; returns at once when there is none."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
