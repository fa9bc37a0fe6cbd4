"""``firmware-sim demo``: the whole data path on one machine, with a live status line.

Starts, as separate processes with the sample configs under ``configs/demo/``:
the simulated fleet, an SMTP catcher saving mails into a folder, the cloud (embedded
broker, embedded SQLite store, one alert rule, the live dashboard page) and a gateway.
Ports are picked at run time and handed to the configs through environment variables;
the page's URL is printed once the cloud serves it.

It stops on Ctrl-C or after ``--duration`` seconds, in the order that loses nothing:
the gateway first (it stops polling and drains its buffer), then the cloud once it
has stored every record the gateway produced, then the simulator and the catcher.
The last line on stdout is a JSON summary; the status line goes to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fieldlink.mqtt import ConnectFailed, MqttConnection, MqttSettings
from fieldlink.snapshot import LAST_HEALTH_FILE, read_snapshot
from gateway.buffer.sqlite_store import produced_records

__all__ = ["DemoError", "run_demo"]

PROCESS_START_TIMEOUT = 20.0
CLOUD_CATCH_UP_TIMEOUT = 20.0


class DemoError(Exception):
    """The demo could not start or stop one of its parts; the message says which and why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in each child: if the demo dies without cleaning up, its children get SIGTERM."""
    with contextlib.suppress(Exception):
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Part:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        with self.log.open("ab") as out:
            # Own session: a Ctrl-C in the terminal reaches the demo only, which then
            # stops the parts in the order that loses nothing.
            self.process = subprocess.Popen(
                self.argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads are running yet)
            )

    async def stop(self, timeout: float = 20.0) -> int | None:
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait()
        return process.returncode

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log.read_text(errors="replace").splitlines()[-15:]
            raise DemoError(
                f"{self.name} exited with status {self.process.returncode}; log {self.log}:\n" + "\n".join(tail)
            )


@dataclass
class _Status:
    gateway: dict[str, Any] = field(default_factory=dict)
    cloud: dict[str, Any] = field(default_factory=dict)

    def line(self, elapsed: float) -> str:
        g, c = self.gateway, self.cloud
        buffered = g.get("buffer", {}).get("messages", 0)
        return (
            f"[{elapsed:5.0f}s] readings {g.get('readings_published', 0)}"
            f" | buffered {buffered}"
            f" | delivered {g.get('records_delivered', 0)}"
            f" | stored {c.get('records_stored', 0)}"
            f" | alerts {c.get('alerts', {}).get('fired_total', 0)}"
            f" | emails {c.get('alerts', {}).get('notifications_sent', 0)}"
            f" | uplink {g.get('uplink', {}).get('state', '-')}"
        )


async def _watch(settings: MqttSettings, topic: str, into: dict[str, Any], seen: asyncio.Event) -> None:
    """Keep ``into`` updated with the latest health JSON on ``topic``."""
    while True:
        conn = MqttConnection(settings, client_id=f"fieldlink-demo-{os.getpid()}-{_free_port()}")
        try:
            await conn.open()
            await conn.subscribe([(topic, 0)])
        except ConnectFailed:
            await asyncio.sleep(0.2)
            continue
        while not conn.closed.done():
            getter = asyncio.ensure_future(conn.messages.get())
            await asyncio.wait([getter, conn.closed], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            with contextlib.suppress(ValueError):
                into.clear()
                into.update(json.loads(getter.result().payload))
                seen.set()


async def _wait_port(part: _Part, port: int) -> None:
    deadline = time.monotonic() + PROCESS_START_TIMEOUT
    while time.monotonic() < deadline:
        part.check_alive()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise DemoError(f"{part.name} did not listen on port {port} within {PROCESS_START_TIMEOUT:g}s; log {part.log}")


def _stored(store_db: Path) -> tuple[set[tuple[str, int]], int]:
    """(device, seq) of every record in the cloud's store, and the number of points (records with values)."""
    if not store_db.exists():
        return set(), 0
    db = sqlite3.connect(f"file:{store_db}?mode=ro", uri=True)
    try:
        records = set(db.execute("SELECT DISTINCT device, seq FROM points").fetchall())
        points = db.execute("SELECT COUNT(*) FROM (SELECT DISTINCT site, gateway, device, ts FROM points)").fetchone()[
            0
        ]
    finally:
        db.close()
    return records, int(points)


class _Demo:
    def __init__(self, configs: Path, workdir: Path, bin_dir: Path) -> None:
        self.workdir = workdir
        self.mail_folder = workdir / "mail"
        self.ports = {name: _free_port() for name in ("MODBUS", "LOCAL", "CLOUD", "SMTP", "CLOUD_WS", "WEB")}
        self.env = dict(os.environ)
        self.env.update({f"FIELDLINK_DEMO_{name}_PORT": str(port) for name, port in self.ports.items()})
        self.env["FIELDLINK_DEMO_DIR"] = str(workdir)

        def part(name: str, *argv: str) -> _Part:
            return _Part(name, [str(bin_dir / argv[0]), *argv[1:]], workdir / "logs" / f"{name}.log")

        self.sim = part("firmware-sim", "firmware-sim", "run", "--config", str(configs / "sim.toml"))
        self.mail = part(
            "mailcatcher",
            "firmware-sim",
            "mailcatcher",
            "--port",
            str(self.ports["SMTP"]),
            "--folder",
            str(self.mail_folder),
        )
        self.cloud = part("cloud", "fieldlink-cloud", "run", "--config", str(configs / "cloud.toml"))
        self.gateway = part("gateway", "fieldlink-gateway", "run", "--config", str(configs / "gateway.toml"))
        self.parts = [self.sim, self.mail, self.cloud, self.gateway]
        self.status = _Status()
        self.watchers: list[asyncio.Task[None]] = []
        self.exit_codes: dict[str, int | None] = {}

    def _watch(self, port: int, topic: str, into: dict[str, Any]) -> asyncio.Event:
        seen = asyncio.Event()
        settings = MqttSettings(url=f"mqtt://127.0.0.1:{port}")
        self.watchers.append(asyncio.create_task(_watch(settings, topic, into, seen)))
        return seen

    async def start(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        (self.workdir / "logs").mkdir(parents=True)
        self.sim.start(self.env)
        self.mail.start(self.env)
        await _wait_port(self.sim, self.ports["MODBUS"])
        await _wait_port(self.mail, self.ports["SMTP"])
        self.cloud.start(self.env)
        await _wait_port(self.cloud, self.ports["CLOUD"])
        await _wait_port(self.cloud, self.ports["WEB"])
        print(f"dashboard: http://127.0.0.1:{self.ports['WEB']}/", file=sys.stderr, flush=True)
        cloud_seen = self._watch(self.ports["CLOUD"], "fl-cloud/+/health", self.status.cloud)
        # The cloud publishes health only once it is subscribed: start the gateway after that.
        async with asyncio.timeout(PROCESS_START_TIMEOUT):
            await cloud_seen.wait()
        self.gateway.start(self.env)
        await _wait_port(self.gateway, self.ports["LOCAL"])
        self._watch(self.ports["LOCAL"], "fl/+/+/health", self.status.gateway)

    async def show_status(self, duration: float | None, stop: asyncio.Event) -> float:
        """Refresh the status line until ``duration`` passed or ``stop`` is set; returns the run time."""
        started = time.monotonic()
        tty = sys.stderr.isatty()
        last_print = 0.0
        logs, mails = self.workdir / "logs", self.mail_folder
        print(f"demo running; logs in {logs}, mails in {mails}; Ctrl-C stops", file=sys.stderr)
        while not stop.is_set():
            elapsed = time.monotonic() - started
            if duration is not None and elapsed >= duration:
                break
            for p in self.parts:
                p.check_alive()
            if tty:
                print("\r" + self.status.line(elapsed) + "\033[K", end="", file=sys.stderr, flush=True)
            elif elapsed - last_print >= 5:
                print(self.status.line(elapsed), file=sys.stderr, flush=True)
                last_print = elapsed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await stop.wait()
        if tty:
            print(file=sys.stderr)
        return time.monotonic() - started

    async def stop_in_order(self) -> tuple[set[tuple[str, int]], set[tuple[str, int]], int]:
        """Gateway first (it drains into the cloud), then the cloud once it stored everything."""
        print("stopping: gateway (drains its buffer) ...", file=sys.stderr)
        self.exit_codes["gateway"] = await self.gateway.stop()
        produced = produced_records(self.workdir / "gateway" / "buffer.db")
        store_db = self.workdir / "cloud" / "points.db"
        deadline = time.monotonic() + CLOUD_CATCH_UP_TIMEOUT
        stored, points = _stored(store_db)
        while not produced <= stored and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            stored, points = _stored(store_db)
        print("stopping: cloud, simulator, mail catcher ...", file=sys.stderr)
        self.exit_codes["cloud"] = await self.cloud.stop()
        stored, points = _stored(store_db)
        return produced, stored, points

    async def close(self) -> None:
        for task in self.watchers:
            task.cancel()
        await asyncio.gather(*self.watchers, return_exceptions=True)
        for p in reversed(self.parts):
            await p.stop()


async def run_demo(configs: Path, workdir: Path, duration: float | None, bin_dir: Path) -> dict[str, Any]:
    demo = _Demo(configs, workdir, bin_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await demo.start()
        elapsed = await demo.show_status(duration, stop)
        produced, stored, points = await demo.stop_in_order()
    finally:
        await demo.close()

    gateway_final = read_snapshot(workdir / "gateway" / LAST_HEALTH_FILE)
    cloud_final = read_snapshot(workdir / "cloud" / LAST_HEALTH_FILE)
    return {
        "duration_s": round(elapsed, 1),
        "readings_published": gateway_final["readings_published"],
        "records_buffered": gateway_final["records_buffered"],
        "records_delivered": gateway_final["records_delivered"],
        "messages_left_in_buffer": gateway_final["buffer"]["messages"],
        "points_stored": points,
        "records_stored": len(stored),
        "alerts_fired": cloud_final["alerts"]["fired_total"],
        "emails_sent": len(list(demo.mail_folder.glob("*.eml"))),
        "records_lost": len(produced - stored),
        "mail_folder": str(demo.mail_folder),
        "exit_codes": demo.exit_codes,
    }
