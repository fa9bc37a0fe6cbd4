"""A private Debian mosquitto instance on a loopback port, as the cloud broker of the tests."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from tests.rig.ports import LOOPBACK, free_port, port_accepts
from tests.rig.servers import (
    ensure_port_free,
    kill_process,
    require_binary,
    spawn,
    stop_process,
    wait_ready,
)


class Mosquitto:
    """`mosquitto -c FILE` in the foreground; `start()` again reuses its port and persistence."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        persistence: bool = True,
        autosave_on_changes: bool = False,
        extra_conf: str = "",
        start_timeout: float = 10.0,
    ) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
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
    def host(self) -> str:
        return LOOPBACK

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {LOOPBACK}",
            "allow_anonymous true",
            # As root, mosquitto otherwise drops to user `mosquitto`, which cannot
            # write a persistence folder created by the test (owned by root).
            "user root",
            # The default (1000) silently drops QoS 1 messages queued for a slow
            # subscriber while the publisher still gets its PUBACK: a loss our
            # tests would blame on the gateway. 0 means unlimited.
            "max_queued_messages 0",
            "log_dest stdout",
            # Not `all`: debug logs every PUBLISH, which slows high-volume tests.
            "log_type error warning notice information subscribe unsubscribe",
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
        ensure_port_free("mosquitto", self.port, self.log_path)
        self._proc = spawn([binary, "-c", str(self.conf_path)], self.log_path)
        wait_ready(
            "mosquitto",
            self._proc,
            lambda: port_accepts(LOOPBACK, self.port),
            self.log_path,
            self.start_timeout,
        )

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
        return f"Mosquitto(port={self.port}, running={self.running}, log={self.log_path})"
