"""Loopback ports picked at run time, and waiting for one to accept connections."""

from __future__ import annotations

import socket
import time

LOOPBACK = "127.0.0.1"

# Interval between two readiness probes: short enough that a server ready in
# ~0.1 s is seen at once, long enough not to spin a core while it starts.
POLL_INTERVAL = 0.02


def free_port(host: str = LOOPBACK) -> int:
    """Return a port the kernel says is free now (bind port 0, read it, close).

    Another process may take it before our server binds it; the servers check
    that the port is still free before starting and say so if it is not.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if a TCP connection to (host, port) succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float) -> None:
    """Poll until (host, port) accepts a connection; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not port_accepts(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept a connection within {timeout:.1f} s")
        time.sleep(POLL_INTERVAL)
