"""What every server of the rig shares: find its binary, wait until it is ready, stop it.

A server is always stopped through its own `Popen` handle, never by name: other
sessions on this machine run their own mosquitto and victoria-metrics.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.rig.ports import LOOPBACK, POLL_INTERVAL, port_accepts

LOG_TAIL_LINES = 40


class ServerError(RuntimeError):
    """A rig server did not start, or did not stop, as expected."""


def ci_mode() -> bool:
    """True under `CI=true`, where a missing server is a failure, never a skip."""
    return os.environ.get("CI", "").strip().lower() == "true"


def require_binary(binary: str, debian_package: str) -> str:
    """Return the path of `binary`; fail under CI, skip elsewhere, when it is missing.

    A developer without the server still gets a green run of everything else;
    CI must never pass by skipping the tests that need it.
    """
    path = shutil.which(binary)
    if path is not None:
        return path
    message = f"{binary!r} not found on PATH: install the Debian package {debian_package!r}"
    if ci_mode():
        pytest.fail(f"{message} (CI=true: a missing server fails the run)", pytrace=False)
    pytest.skip(message)


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a server log, for error messages."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {log_path}: {exc}>"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "<log is empty>"


def not_ready_error(name: str, log_path: Path, reason: str) -> ServerError:
    return ServerError(f"{name}: {reason}; log {log_path}, last lines:\n{log_tail(log_path)}")


def ensure_port_free(name: str, port: int, log_path: Path) -> None:
    """Refuse to start on a port someone already serves.

    Otherwise a readiness probe would be answered by that other process and the
    test would talk to a server that is not ours.
    """
    if port_accepts(LOOPBACK, port):
        raise ServerError(f"{name}: port {port} is already in use by another process (log {log_path})")


def wait_ready(
    name: str,
    proc: subprocess.Popen[bytes],
    is_ready: Callable[[], bool],
    log_path: Path,
    timeout: float,
) -> None:
    """Poll `is_ready` until it is true; fail early if the process exits, or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise not_ready_error(name, log_path, f"exited with code {code} before it was ready")
        if is_ready():
            return
        if time.monotonic() >= deadline:
            raise not_ready_error(name, log_path, f"not ready within {timeout:.1f} s")
        time.sleep(POLL_INTERVAL)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM our own process and wait; SIGKILL it if it does not exit in time.

    Returns the exit code. A server that needs SIGKILL is reported by a
    negative code (-9), so a test asserting a clean shutdown can see it.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def kill_process(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL our own process (a crash, for tests) and reap it."""
    if proc.poll() is None:
        proc.kill()
    return proc.wait()


def spawn(argv: list[str], log_path: Path, preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr appended to `log_path` (a restart keeps the history)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"---- starting: {' '.join(argv)}\n".encode())
        log.flush()
        # The child keeps its own copy of the descriptor; ours can be closed now.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,  # noqa: PLW1509 (tests start processes from the main thread)
        )
