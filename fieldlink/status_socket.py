"""``status`` for a running program: its health report, asked over a Unix socket in its state dir.

The running gateway or cloud listens on ``<state_dir>/control.sock`` (mode 0600: the
service user and root). A client sends one line, ``status``, and reads one JSON object:
the program's own health report (the one it publishes on its health topic), plus the
sections registered with :meth:`StatusServer.add_section` and the last warnings and
errors of its log. ``fieldlink-gateway status`` and ``fieldlink-cloud status`` print it
(:func:`status_command`); with the program stopped they say so and exit 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import re
import socket
import sys
import time
import tomllib
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from fieldlink.logs import KeyValueFormatter
from fieldlink.snapshot import LAST_HEALTH_FILE, read_snapshot

__all__ = [
    "CONTROL_SOCKET",
    "EXIT_NOT_RUNNING",
    "NotRunning",
    "RecentProblems",
    "StatusServer",
    "ask_status",
    "state_dir_of",
    "status_command",
]

log = logging.getLogger(__name__)

CONTROL_SOCKET = "control.sock"
EXIT_NOT_RUNNING = 3  # as LSB init scripts' "status": program is not running
REQUEST = b"status\n"
MAX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
RECENT_PROBLEMS = 10
REQUEST_TIMEOUT = 2.0  # seconds a client may take to send its request line

Report = Callable[[], Awaitable[dict[str, Any]]]
Section = Callable[[], Any]
"""Returns a JSON-able value (a dict, usually), or an awaitable of one."""


class RecentProblems(logging.Handler):
    """Keeps the last warnings and errors of this process, as log lines, for ``status``."""

    def __init__(self, size: int = RECENT_PROBLEMS) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(KeyValueFormatter())
        self._lines: deque[str] = deque(maxlen=size)  # appends are thread-safe

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a broken record must not break the program that logged it
            return
        self._lines.append(line if len(line) <= 600 else line[:597] + "...")

    def lines(self) -> list[str]:
        return list(self._lines)


class StatusServer:
    """Serves ``report()`` (plus sections) as JSON on a Unix socket; a failure here never stops the program."""

    def __init__(self, path: Path, report: Report) -> None:
        self.path = path
        self._report = report
        self._sections: dict[str, Section] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self.problems = RecentProblems()

    def add_section(self, name: str, section: Section) -> None:
        """Add ``name: section()`` to every status answer (a key of the health report wins a clash)."""
        self._sections[name] = section

    async def snapshot(self) -> dict[str, Any]:
        body = dict(await self._report())
        for name, section in self._sections.items():
            try:
                value = section()
                if inspect.isawaitable(value):
                    value = await value
            except Exception as exc:  # one broken section must not hide the rest of the status
                value = {"error": f"{type(exc).__name__}: {exc}"}
            body.setdefault(name, value)
        body.setdefault("pid", os.getpid())
        body.setdefault("recent_problems", self.problems.lines())
        return body

    async def start(self) -> None:
        logging.getLogger().addHandler(self.problems)
        partial = self.path.with_name(f".{os.getpid()}.sock")  # no longer than the real name: the limit below
        if max(len(str(partial).encode()), len(str(self.path).encode())) > MAX_PATH:
            log.error(
                "state_dir path too long for the control socket; `status` will not work",
                extra={"path": str(self.path)},
            )
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            sock.bind(str(partial))
            # Private before it has its name: nobody else can connect in between.
            os.chmod(partial, 0o600)
            # Replaces a socket a killed process left behind; a live one in the same state
            # dir would be another copy of this program on the same buffer, a bigger problem.
            os.replace(partial, self.path)
            self._inode = os.stat(self.path).st_ino
            sock.listen(8)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                partial.unlink()
            log.error("cannot open the control socket; `status` will not work", extra={"error": str(exc)})

    async def stop(self) -> None:
        logging.getLogger().removeHandler(self.problems)
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await server.wait_closed()
        # Only our own: after a reload the next app's socket has the same name.
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await reader.readline()
            if request.strip() == REQUEST.strip():
                answer: dict[str, Any] = await self.snapshot()
            else:
                answer = {"error": f"unknown request {request[:40]!r}; send 'status'"}
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        except Exception as exc:  # a client that hangs up or dawdles is its own problem
            log.debug("status request failed", extra={"error": repr(exc)})
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# --- the client side -------------------------------------------------------------------


class NotRunning(Exception):
    """No program answers on the control socket."""


def ask_status(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """The running program's status; NotRunning if nothing listens, OSError for other trouble."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise NotRunning(f"no control socket at {path}") from None
        except ConnectionRefusedError:
            raise NotRunning(f"nothing listens on {path} (left behind by a crash)") from None
        sock.sendall(REQUEST)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        raise OSError(f"{path}: the program closed the connection without an answer")
    body = json.loads(data)
    if not isinstance(body, dict):
        raise OSError(f"{path}: unexpected answer {data[:80]!r}")
    return body


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def state_dir_of(path: str, section: str, default: Path) -> Path:
    """``[section] state_dir`` read straight from the file, for when the whole config does not load.

    ``status`` runs in an operator's shell, not in the service: the environment variables
    and credential files the service's secrets come from are usually missing there, and
    none of them matters for finding the socket. Raises ValueError if even this fails.
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    value = data.get(section, {}).get("state_dir", str(default))
    if not isinstance(value, str):
        raise ValueError(f"{path}: {section}.state_dir: expected a path, got {value!r}")

    def substitute(match: re.Match[str]) -> str:
        found = os.environ.get(match.group(1))
        if found or (found is not None and match.group(2) is None):
            return found
        if match.group(2) is not None:
            return match.group(2)
        raise ValueError(f"{path}: {section}.state_dir: environment variable {match.group(1)} is not set")

    return Path(_ENV_REF.sub(substitute, value))


def format_age(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_time(ms: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def status_command(
    program: str,
    state_dir: Path,
    render: Callable[[dict[str, Any]], str],
    *,
    as_json: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """What ``<program> status`` does: 0 with the status printed, 3 if not running, 1 if it cannot ask."""
    path = state_dir / CONTROL_SOCKET
    try:
        report = ask_status(path)
    except NotRunning as exc:
        print(f"{program} is not running: {exc}", file=sys.stderr if as_json else out)
        print(_last_snapshot(state_dir), file=sys.stderr if as_json else out)
        return EXIT_NOT_RUNNING
    except PermissionError:
        print(f"{program} status: no permission to use {path}; run as root or as the service's user", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{program} status: no answer on {path}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True), file=out)
    else:
        print(render(report), file=out)
    return 0


def _last_snapshot(state_dir: Path) -> str:
    path = state_dir / LAST_HEALTH_FILE
    try:
        ts = read_snapshot(path).get("ts")
    except FileNotFoundError:
        return f"no health snapshot at {path} (written when the program stops)"
    except (OSError, ValueError) as exc:
        return f"health snapshot {path} unreadable: {exc}"
    if not isinstance(ts, int | float):
        return f"last health snapshot: {path}"
    age = format_age(time.time() - ts / 1000)
    return f"last health snapshot: {path}, written {format_time(ts)} ({age} ago)"
