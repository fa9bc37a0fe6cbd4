"""Our own programs (fieldlink-gateway, fieldlink-cloud, firmware-sim) as real processes.

Tests write a TOML config, start the console script installed next to the test's
Python, and stop it by its own process handle: SIGTERM (asserting the exit code
where a clean shutdown matters) or SIGKILL (a crash).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import Popen

from tests.rig.ports import LOOPBACK, wait_port
from tests.rig.servers import ServerError, kill_process, log_tail, spawn, stop_process

__all__ = ["Program", "Programs"]

BIN = Path(sys.executable).parent


class Program:
    """One of our console scripts with its config, log file and process handle."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = [str(BIN / argv[0]), *argv[1:]]
        self.log_path = log_path
        self.process: Popen[bytes] | None = None

    def start(self, preexec_fn: Callable[[], None] | None = None) -> Program:
        """Start the program; ``preexec_fn`` runs in the child first (resource limits)."""
        if self.running:
            raise ServerError(f"{self.name} is already running")
        self.process = spawn(self.argv, self.log_path, preexec_fn)
        return self

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        """Wait until the program listens on ``port``; fail with its log if it exits first."""
        try:
            wait_port(LOOPBACK, port, timeout)
        except TimeoutError:
            raise ServerError(f"{self.name} did not listen on {port}:\n{log_tail(self.log_path)}") from None
        if not self.running:
            raise ServerError(f"{self.name} exited:\n{log_tail(self.log_path)}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code (negative if it had to be killed)."""
        assert self.process is not None
        return stop_process(self.process, timeout)

    def kill(self) -> int:
        assert self.process is not None
        return kill_process(self.process)

    def signal(self, signum: int) -> None:
        """Send ``signum`` (SIGHUP: reload the config) to the running program."""
        if not self.running:
            raise ServerError(f"{self.name} is not running:\n{log_tail(self.log_path)}")
        assert self.process is not None
        self.process.send_signal(signum)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Programs:
    """Starts programs for one test and stops whatever is still running at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Program] = []

    @property
    def log_paths(self) -> list[Path]:
        return [p.log_path for p in self.started]

    def config(self, name: str, text: str) -> Path:
        path = self.workdir / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def program(self, name: str, *argv: str) -> Program:
        program = Program(name, list(argv), self.workdir / "logs" / f"{name}.log")
        self.started.append(program)
        return program

    def gateway(self, config_text: str, name: str = "gateway") -> Program:
        path = self.config(name, config_text)
        return self.program(name, "fieldlink-gateway", "run", "--config", str(path))

    def cloud(self, config_text: str, name: str = "cloud") -> Program:
        path = self.config(name, config_text)
        return self.program(name, "fieldlink-cloud", "run", "--config", str(path))

    def simulator(self, config_text: str, name: str = "sim") -> Program:
        path = self.config(name, config_text)
        return self.program(name, "firmware-sim", "run", "--config", str(path))

    def stop_all(self) -> None:
        for program in reversed(self.started):
            if program.running:
                program.stop()

    @contextmanager
    def session(self) -> Iterator[Programs]:
        try:
            yield self
        finally:
            self.stop_all()
