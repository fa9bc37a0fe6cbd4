"""A private Debian mosquitto instance on a loopback port, as the cloud broker of the tests.

By default: one plain listener, anonymous clients allowed. A test may add a TLS
listener (`tls=TlsListener(...)`, on a second port: `tls_url`) and require a user
name and password (`users={"name": "password"}`); both listeners then share the
same authentication, as mosquitto 2.0 does without `per_listener_settings`.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.rig.ports import LOOPBACK, free_port, port_accepts
from tests.rig.servers import (
    ServerError,
    ensure_port_free,
    kill_process,
    require_binary,
    spawn,
    stop_process,
    wait_ready,
)


@dataclass(frozen=True)
class TlsListener:
    """A TLS listener: the broker's certificate, and what it asks of clients."""

    cafile: Path  # CA that client certificates must chain to
    certfile: Path
    keyfile: Path
    require_certificate: bool = False  # mTLS: refuse clients without a certificate from `cafile`
    use_identity_as_username: bool = False  # the client certificate's CN becomes the user name

    def config_lines(self) -> list[str]:
        lines = [
            f"cafile {self.cafile}",
            f"certfile {self.certfile}",
            f"keyfile {self.keyfile}",
            f"require_certificate {'true' if self.require_certificate else 'false'}",
        ]
        if self.use_identity_as_username:
            lines.append("use_identity_as_username true")
        return lines


class Mosquitto:
    """`mosquitto -c FILE` in the foreground; `start()` again reuses its ports and persistence."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        persistence: bool = True,
        autosave_on_changes: bool = False,
        extra_conf: str = "",
        start_timeout: float = 10.0,
        tls: TlsListener | None = None,
        tls_port: int | None = None,
        users: Mapping[str, str] | None = None,
        allow_anonymous: bool | None = None,
    ) -> None:
        """`allow_anonymous` defaults to true, except with `users` or a certificate-as-user-name listener."""
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.tls = tls
        self.tls_port = (tls_port if tls_port is not None else free_port()) if tls is not None else None
        self.users = dict(users) if users is not None else None
        if allow_anonymous is None:
            allow_anonymous = users is None and not (tls is not None and tls.use_identity_as_username)
        self.allow_anonymous = allow_anonymous
        self.password_path = workdir / "passwd"
        self.persistence = persistence
        self.autosave_on_changes = autosave_on_changes
        self.extra_conf = extra_conf
        self.start_timeout = start_timeout
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.data_dir = workdir / "data"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise RuntimeError("this mosquitto has no TLS listener: pass tls=TlsListener(...)")
        return f"mqtts://{LOOPBACK}:{self.tls_port}"

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {LOOPBACK}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            # As root, mosquitto otherwise drops to user `mosquitto`, which cannot
            # write a persistence folder created by the test (owned by root).
            "user root",
            # The default (1000) silently drops QoS 1 messages queued for a slow
            # subscriber while the publisher still gets its PUBACK: a loss our
            # tests would blame on the gateway. 0 means unlimited.
            "max_queued_messages 0",
            "log_dest stdout",
            # Not `all`: debug logs every PUBLISH, which slows high-volume tests. One type
            # per line: mosquitto 2.0 reads only the first word of a log_type line.
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "log_type unsubscribe",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
        ]
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.data_dir}/",
                # Save every ~1-2 s, not every 30 min (the default), so that a
                # kill() loses little. For an exact crash point, call save().
                "autosave_interval 1",
                # Counting changes instead (interval 1 = a save per change) rewrites
                # the whole file per queued message: 618 msg/s with 2k queued, 280
                # with 8k, against ~10k msg/s on the timer. It also still lost the
                # last retained message to a kill: it saves only once the count
                # *exceeds* the interval.
                f"autosave_on_changes {'true' if self.autosave_on_changes else 'false'}",
            ]
        else:
            lines.append("persistence false")
        if self.users is not None:
            lines.append(f"password_file {self.password_path}")
        if self.tls is not None:
            # Listener options apply to the listener line above them: keep these last.
            lines += [f"listener {self.tls_port} {LOOPBACK}", *self.tls.config_lines()]
        if self.extra_conf.strip():
            lines += ["# extra_conf", *self.extra_conf.strip().splitlines()]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start mosquitto; return when its port accepts connections."""
        if self.running:
            raise RuntimeError(f"mosquitto on port {self.port} is already running")
        binary = require_binary("mosquitto", "mosquitto")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.persistence:
            self.data_dir.mkdir(exist_ok=True)
        self.conf_path.write_text(self.config_text())
        if self.users is not None:
            self._write_password_file()
        ports = [self.port] if self.tls_port is None else [self.port, self.tls_port]
        for port in ports:
            ensure_port_free("mosquitto", port, self.log_path)
        self._proc = spawn([binary, "-c", str(self.conf_path)], self.log_path)
        wait_ready(
            "mosquitto",
            self._proc,
            lambda: all(port_accepts(LOOPBACK, port) for port in ports),
            self.log_path,
            self.start_timeout,
        )

    def _write_password_file(self) -> None:
        """Hash `users` into the password file with Debian's mosquitto_passwd."""
        assert self.users is not None
        tool = require_binary("mosquitto_passwd", "mosquitto")
        self.password_path.unlink(missing_ok=True)
        for i, (user, password) in enumerate(self.users.items()):
            # -c creates the file; without it, the user is added to the existing one.
            create = ["-c"] if i == 0 else []
            done = subprocess.run(
                [tool, "-b", *create, str(self.password_path), user, password],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if done.returncode != 0:
                raise ServerError(f"mosquitto_passwd failed for user {user!r}: {done.stdout}{done.stderr}")
        if not self.users:
            self.password_path.write_text("")  # nobody may log in

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait: a clean shutdown, on which mosquitto saves its persistence file."""
        if self._proc is None:
            return None
        code = stop_process(self._proc, timeout)
        self._proc = None
        return code

    @property
    def db_path(self) -> Path:
        return self.data_dir / "mosquitto.db"

    def save(self, timeout: float = 5.0) -> None:
        """Write the persistence file now (SIGUSR1) and wait until it was replaced.

        After this returns, a kill() loses nothing that was accepted before the call.
        """
        if not self.persistence:
            raise RuntimeError("mosquitto runs without persistence: nothing to save")
        if self._proc is None or not self.running:
            raise RuntimeError(f"mosquitto on port {self.port} is not running")

        def file_id() -> tuple[int, int] | None:
            try:
                st = self.db_path.stat()
            except FileNotFoundError:
                return None
            return st.st_ino, st.st_mtime_ns

        before = file_id()
        self._proc.send_signal(signal.SIGUSR1)
        # mosquitto writes mosquitto.db.new and renames it: a new inode means a finished save.
        wait_ready("mosquitto save", self._proc, lambda: file_id() != before, self.log_path, timeout)

    def kill(self) -> int | None:
        """SIGKILL: a crash; only what autosave already wrote survives."""
        if self._proc is None:
            return None
        code = kill_process(self._proc)
        self._proc = None
        return code

    def __repr__(self) -> str:
        tls = f", tls_port={self.tls_port}" if self.tls_port is not None else ""
        return f"Mosquitto(port={self.port}{tls}, running={self.running}, log={self.log_path})"
