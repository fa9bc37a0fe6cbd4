"""Helpers shared by the benchmarks in ``bench/``: servers, /proc figures, raw MQTT, statistics.

Nothing here knows about one benchmark. The benchmarks run as modules from the repository
root (``python -m bench.NAME``), so they share the test rig's helpers too::

    from bench._common import Mosquitto, ProcStats, Subscriber, median

What it holds:

- ports and waiting: :func:`free_port`, :func:`port_accepts`, :func:`wait_until`;
- processes: :func:`spawn` (output to a log file), :func:`stop_process` (SIGTERM, then
  SIGKILL after a timeout), :func:`log_tail`;
- :class:`Mosquitto`: Debian's ``mosquitto`` on a loopback port with the test rig's settings
  (persistence on, ``autosave_interval 1``, ``max_queued_messages 0``) plus extra lines;
- /proc: :class:`ProcStats` (peak and current RSS, CPU seconds of a process and of each
  of its threads), :class:`StateSampler` (how often a process ran or waited for the disk
  while a ``with`` block ran), :func:`load_average`;
- raw MQTT 3.1.1 over a plain socket, fast enough that the client is not what a benchmark
  measures: :func:`publish_qos1` (publisher with a window of PUBACKs) and :class:`Subscriber`
  (a child process with a QoS 0 subscription that counts PUBLISH packets, or fieldlink records
  by distinct ``(device, seq)``, and shares its counters with the parent);
- statistics: :func:`median`, :func:`percentile`; formatting: :func:`fmt_int`, :func:`fmt_mb`.

Every process is started and stopped through its own handle, never by name: other
sessions on the machine run their own mosquitto.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# The same helpers as the test rig's, not copies of them.
from tests.rig.ports import LOOPBACK, free_port, port_accepts
from tests.rig.servers import stop_process

__all__ = [
    "LOOPBACK",
    "BenchError",
    "Counts",
    "Mosquitto",
    "ProcIO",
    "ProcStats",
    "StateSampler",
    "Subscriber",
    "fmt_int",
    "fmt_mb",
    "free_port",
    "load_average",
    "log_tail",
    "median",
    "percentile",
    "port_accepts",
    "publish_qos1",
    "spawn",
    "stop_process",
    "wait_until",
]

POLL_INTERVAL = 0.02
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark cannot go on (a server did not start, a drain stalled, ...); the message says why."""


# --- ports and waiting ---------------------------------------------------------------------


def wait_until(what: str, predicate: Callable[[], bool], timeout: float, interval: float = POLL_INTERVAL) -> None:
    """Poll ``predicate`` until it is true; BenchError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise BenchError(f"{what}: not within {timeout:.1f} s")
        time.sleep(interval)


# --- processes -----------------------------------------------------------------------------


def spawn(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"---- starting: {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)


def log_tail(log_path: Path, lines: int = 30) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {log_path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:]) or "<log is empty>"


# --- mosquitto -----------------------------------------------------------------------------


class Mosquitto:
    """``mosquitto -c FILE`` on a loopback port; ``start()`` again keeps the port and the persistence."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistence: bool = True,
        autosave_interval: int = 1,
        extra: Iterable[str] = (),
    ) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.extra = list(extra)
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.data_dir = workdir / "data"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"mosquitto on port {self.port} is not running")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {LOOPBACK}",
            "allow_anonymous true",
            "user root",  # as root it would switch to `mosquitto`, who cannot write our temp dir
            "max_queued_messages 0",  # the default (1000) drops QoS 1 messages after PUBACK
            # A file, not stdout: mosquitto flushes its log file per line, but block-buffers
            # stdout when it is not a terminal, so a log read while it runs would be stale.
            f"log_dest file {self.log_path}",
            # One type per line: mosquitto 2.0 reads only the first word of a log_type line
            # (`log_type error warning notice information` logs errors only).
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
        ]
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.data_dir}/",
                f"autosave_interval {self.autosave_interval}",
                "autosave_on_changes false",
            ]
        else:
            lines.append("persistence false")
        return "\n".join([*lines, *self.extra]) + "\n"

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            raise BenchError(f"mosquitto on port {self.port} is already running")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise BenchError("mosquitto not found: apt-get install mosquitto")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.conf_path.write_text(self.config_text())
        if port_accepts(LOOPBACK, self.port):
            raise BenchError(f"port {self.port} is already taken by another process")
        self.proc = proc = spawn([binary, "-c", str(self.conf_path)], self.log_path)

        def ready() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"mosquitto exited with {proc.returncode}; log:\n{log_tail(self.log_path)}")
            return port_accepts(LOOPBACK, self.port)

        wait_until(f"mosquitto on port {self.port} accepting connections", ready, timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (mosquitto saves its persistence file on the way out) and wait."""
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout)
        self.proc = None
        return code


# --- /proc ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcStats:
    """A snapshot of one process from /proc: memory in bytes, CPU in seconds (user + system)."""

    pid: int
    peak_rss: int  # VmHWM
    rss: int  # VmRSS
    cpu: float
    threads: dict[int, tuple[str, float]]  # thread id: (name, CPU seconds); the main thread's id is pid

    @classmethod
    def read(cls, pid: int) -> ProcStats:
        status: dict[str, int] = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                status[key] = int(value.split()[0]) * 1024
        threads: dict[int, tuple[str, float]] = {}
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    threads[int(task.name)] = _stat_cpu(task / "stat")
        return cls(
            pid, status.get("VmHWM", 0), status.get("VmRSS", 0), _stat_cpu(Path(f"/proc/{pid}/stat"))[1], threads
        )

    @property
    def main_thread_cpu(self) -> float:
        return self.threads.get(self.pid, ("", self.cpu))[1]


def _stat_cpu(path: Path) -> tuple[str, float]:
    """(comm, utime + stime in seconds) from a /proc stat file."""
    text = path.read_text()
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat


class StateSampler:
    """Samples the scheduler state of processes' threads in a background thread (``with`` block).

    CPU seconds say how busy a process was; this says what it did meanwhile. For each
    process, the share of samples in which its main thread was running or runnable (R:
    on a CPU or waiting for one, so on a loaded machine it exceeds the CPU share), in which
    another of its threads was, and in which any of its threads waited for the disk (D).
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.02) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.samples = 0
        self._main = dict.fromkeys(pids, 0)
        self._others = dict.fromkeys(pids, 0)
        self._disk = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="state-sampler", daemon=True)

    def __enter__(self) -> StateSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples += 1
            for name, pid in self.pids.items():
                states = _thread_states(pid)
                self._main[name] += states.get(pid) == "R"
                self._others[name] += any(state == "R" for tid, state in states.items() if tid != pid)
                self._disk[name] += "D" in states.values()

    def running(self, name: str) -> float:
        """Share (0..1) of samples with the main thread running or runnable."""
        return self._main[name] / max(self.samples, 1)

    def others_running(self, name: str) -> float:
        """Share (0..1) of samples with another thread running or runnable."""
        return self._others[name] / max(self.samples, 1)

    def disk_wait(self, name: str) -> float:
        """Share (0..1) of samples with a thread in uninterruptible (disk) sleep."""
        return self._disk[name] / max(self.samples, 1)


def _thread_states(pid: int) -> dict[int, str]:
    states: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = (task / "stat").read_text()
                states[int(task.name)] = text[text.rindex(")") + 2]
    return states


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen


# --- statistics and formatting -------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def fmt_mb(size: float) -> str:
    return f"{size / 1e6:,.1f} MB"


# --- raw MQTT 3.1.1 ------------------------------------------------------------------------


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _connect(
    host: str, port: int, client_id: str, *, clean_session: bool, keepalive: int, timeout: float = 10.0
) -> socket.socket:
    """Open a TCP connection and an MQTT 3.1.1 session; BenchError unless the broker accepts it."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    flags = 0x02 if clean_session else 0x00
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _utf8(client_id)
    sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
    connack = _recv_exactly(sock, 4)
    if connack[0] != 0x20 or connack[3] != 0:
        sock.close()
        raise BenchError(f"broker {host}:{port} refused the connection: CONNACK {connack.hex()}")
    return sock


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise BenchError("broker closed the connection")
        data += chunk
    return bytes(data)


def publish_qos1(
    host: str,
    port: int,
    messages: Iterable[tuple[str, bytes]],
    *,
    client_id: str = "bench-pub",
    window: int = 4096,
    timeout: float = 60.0,
) -> int:
    """Publish at QoS 1 in rounds of ``window`` messages, two rounds in flight; returns the count acknowledged.

    Round k uses packet ids ``(k % 2) * window + 1 ...``, and round k + 2 is sent only once
    every PUBACK of round k is in, so no id is reused while unacknowledged.
    """
    if not 1 <= window <= 32767:
        raise ValueError("window must be 1..32767")
    sock = _connect(host, port, client_id, clean_session=True, keepalive=0, timeout=timeout)
    acknowledged = 0
    in_flight = 0  # messages of the round sent before the current one, not yet acknowledged
    try:
        batch: list[bytes] = []
        offset = 0
        for topic_name, payload in messages:
            variable = _utf8(topic_name) + struct.pack("!H", offset + len(batch) + 1)
            batch.append(b"\x32" + _remaining_length(len(variable) + len(payload)) + variable + payload)
            if len(batch) == window:
                sock.sendall(b"".join(batch))
                acknowledged += _await_pubacks(sock, in_flight)
                in_flight, batch, offset = len(batch), [], window - offset
        if batch:
            sock.sendall(b"".join(batch))
        acknowledged += _await_pubacks(sock, in_flight + len(batch))
        sock.sendall(b"\xe0\x00")  # DISCONNECT
    finally:
        sock.close()
    return acknowledged


def _await_pubacks(sock: socket.socket, count: int) -> int:
    acks = _recv_exactly(sock, 4 * count)
    if acks[::4] != b"\x40" * count:  # PUBACK: 0x40 0x02 id id
        raise BenchError("publisher got something other than PUBACKs")
    return count


@dataclass(frozen=True, slots=True)
class Counts:
    """What a :class:`Subscriber` has counted so far (times are ``time.monotonic()``, 0 if none)."""

    messages: int  # PUBLISH packets on topics that carry the counted items
    items: int  # distinct records (mode "records") or messages (mode "messages")
    duplicates: int  # records seen again (mode "records")
    other: int  # PUBLISH packets on other topics (status, health, ...)
    first_at: float
    last_at: float  # when the last new item was counted


_FIELDS = ("messages", "items", "duplicates", "other", "first_at", "last_at", "verified")


@dataclass(frozen=True, slots=True)
class _SubscriberSpec:
    host: str
    port: int
    topic_filter: str
    client_id: str
    mode: Literal["records", "messages"]
    clean_session: bool
    verify_every: int
    connect_timeout: float
    keepalive: int = 60


class Subscriber:
    """A raw MQTT 3.1.1 subscriber in a child process, QoS 0, counting what arrives.

    A QoS 0 subscription needs no acknowledgements, so the broker streams as fast as the
    child reads, and the counter (well over 100k messages/s on one core) is not what is
    measured. The parent reads the counters with :meth:`counts` at any time.

    ``mode="records"`` counts fieldlink records by distinct ``(device, seq)`` from record and
    batch envelopes on topics ending in ``/telemetry`` or ``/batch``. It reads ``dev`` and
    ``seq`` straight from the unpacked envelope (``fieldlink.wire.decode`` does ~50k
    records/s, so it would be the bottleneck) and checks every ``verify_every``-th message,
    and any envelope it does not recognise, with ``fieldlink.wire.decode``: a disagreement
    stops the child with an error. ``mode="messages"`` counts PUBLISH packets only.

    With ``clean_session=False`` the broker keeps the session (and, with
    ``queue_qos0_messages true``, queues for it) while the child is not connected: connect
    once, :meth:`stop`, and a later subscriber with the same ``client_id`` gets what arrived
    in between, even what arrived before it connected.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic_filter: str,
        *,
        client_id: str = "bench-sub",
        mode: Literal["records", "messages"] = "records",
        clean_session: bool = True,
        verify_every: int = 256,
        timeout: float = 30.0,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._timeout = timeout
        self._shared = ctx.RawArray("d", len(_FIELDS))
        self._started = ctx.Event()
        self._ready = ctx.Event()
        self._errors: Any = ctx.SimpleQueue()
        spec = _SubscriberSpec(host, port, topic_filter, client_id, mode, clean_session, verify_every, timeout)
        self._proc = ctx.Process(
            target=_subscriber_main,
            args=(spec, self._shared, self._started, self._ready, self._errors),
            name=f"subscriber-{client_id}",
            daemon=True,
        )

    def start(self, *, wait: bool = True) -> None:
        """Start the child; return once it is subscribed, or with ``wait=False`` once it is trying to.

        The child retries refused connections for ``timeout`` seconds, so it may be started
        before its broker; :meth:`wait_subscribed` then waits for the subscription.
        """
        self._proc.start()
        self._wait("started", self._started)
        if wait:
            self.wait_subscribed()

    def wait_subscribed(self) -> None:
        self._wait("subscribed", self._ready)

    def _wait(self, what: str, event: Any) -> None:
        deadline = time.monotonic() + self._timeout
        while not event.wait(0.02):
            self.check()
            if time.monotonic() > deadline:
                raise BenchError(f"subscriber not {what} within {self._timeout:.0f} s")

    @property
    def pid(self) -> int:
        if self._proc.pid is None:
            raise BenchError("subscriber is not started")
        return self._proc.pid

    def counts(self) -> Counts:
        values = list(self._shared)
        return Counts(int(values[0]), int(values[1]), int(values[2]), int(values[3]), values[4], values[5])

    @property
    def verified(self) -> int:
        """Messages whose records were checked with ``fieldlink.wire.decode``."""
        return int(self._shared[6])

    def check(self) -> None:
        """BenchError if the child has failed."""
        if not self._errors.empty():
            raise BenchError(f"subscriber failed: {self._errors.get()}")
        if self._proc.exitcode is not None:
            raise BenchError(f"subscriber exited with code {self._proc.exitcode}")

    def stop(self) -> None:
        """SIGTERM (the child sends DISCONNECT within a second), then SIGKILL if need be."""
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)


def _subscriber_main(spec: _SubscriberSpec, shared: Any, started: Any, ready: Any, errors: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us, on Ctrl-C too
    session = _CountingSession(spec, shared, ready)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: session.stop())
    started.set()
    try:
        session.run()
    except Exception as exc:
        errors.put(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None


def _split_packets(buf: bytearray) -> tuple[list[tuple[int, int, int]], int]:
    """Complete MQTT packets at the start of ``buf``: (first byte, body start, end), and the bytes used."""
    packets: list[tuple[int, int, int]] = []
    pos, size = 0, len(buf)
    while size - pos >= 2:
        # Remaining length: 1 to 4 bytes, 7 bits each, least significant first.
        length = shift = 0
        i = pos + 1
        while i < size:
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if byte < 0x80:
                break
            shift += 7
        else:
            break  # the length itself is incomplete
        if i + length > size:
            break
        packets.append((buf[pos], i, i + length))
        pos = i + length
    return packets, pos


class _CountingSession:
    """The child's side of :class:`Subscriber`: one connection, a loop of bulk reads."""

    def __init__(self, spec: _SubscriberSpec, shared: Any, ready: Any) -> None:
        self.spec = spec
        self.shared = shared
        self.ready = ready
        self.records = _RecordCounter(spec.verify_every) if spec.mode == "records" else None
        self.messages = self.items = self.other = 0
        self.first_at = self.last_at = 0.0
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def _connect(self) -> socket.socket:
        spec = self.spec
        deadline = time.monotonic() + spec.connect_timeout
        while True:
            try:
                return _connect(
                    spec.host, spec.port, spec.client_id, clean_session=spec.clean_session, keepalive=spec.keepalive
                )
            except ConnectionRefusedError:
                if time.monotonic() > deadline or self._stopping:
                    raise
                time.sleep(0.005)

    def run(self) -> None:
        sock = self._connect()
        body = struct.pack("!H", 1) + _utf8(self.spec.topic_filter) + b"\x00"  # packet id 1, QoS 0
        sock.sendall(b"\x82" + _remaining_length(len(body)) + body)
        sock.settimeout(1.0)
        buf = bytearray()
        last_sent = time.monotonic()
        while not self._stopping:
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                chunk = None
            if chunk == b"":
                raise BenchError("broker closed the connection")
            if time.monotonic() - last_sent > self.spec.keepalive / 2:
                sock.sendall(b"\xc0\x00")  # PINGREQ
                last_sent = time.monotonic()
            if chunk:
                buf += chunk
                packets, used = _split_packets(buf)
                new_items = sum(self._handle(buf, *packet) for packet in packets)
                del buf[:used]
                self._publish_counters(new_items)
        with contextlib.suppress(OSError):
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        sock.close()

    def _handle(self, buf: bytearray, header: int, start: int, end: int) -> int:
        """Count one packet; returns the number of new items."""
        kind = header >> 4
        if kind == 9:  # SUBACK: packet id, then one return code
            if buf[start + 2] == 0x80:
                raise BenchError(f"subscription to {self.spec.topic_filter!r} refused")
            self.ready.set()
            return 0
        if kind != 3:  # not a PUBLISH (PINGRESP, ...)
            return 0
        topic_end = start + 2 + (buf[start] << 8 | buf[start + 1])
        if self.records is None:
            self.messages += 1
            return 1
        if not buf[start + 2 : topic_end].endswith((b"/telemetry", b"/batch")):
            self.other += 1
            return 0
        self.messages += 1
        payload_start = topic_end + (2 if header & 0x06 else 0)  # a packet id at QoS 1 and 2
        return self.records.add(bytes(buf[payload_start:end]))

    def _publish_counters(self, new_items: int) -> None:
        if new_items:
            self.items += new_items
            self.last_at = time.monotonic()
            self.first_at = self.first_at or self.last_at
        shared = self.shared
        shared[0] = self.messages
        shared[2] = self.records.duplicates if self.records else 0
        shared[3] = self.other
        shared[4] = self.first_at
        shared[5] = self.last_at
        shared[6] = self.records.verified if self.records else 0
        shared[1] = self.items  # last: a reader that sees all items also sees their last_at


class _RecordCounter:
    """Distinct (device, seq) of fieldlink record and batch envelopes."""

    def __init__(self, verify_every: int) -> None:
        import msgpack  # noqa: PLC0415 (only the child needs it)

        from fieldlink.wire import decode  # noqa: PLC0415

        self._unpack = msgpack.unpackb
        self._decode = decode
        self._verify_every = verify_every
        self._seen: dict[str, set[int]] = {}
        self._messages = 0
        self.duplicates = 0
        self.verified = 0

    def _ids(self, payload: bytes) -> list[tuple[str, int]] | None:
        """(device, seq) read straight from a known envelope; None for anything else."""
        try:
            envelope = json.loads(payload) if payload[0] == 0x7B else self._unpack(payload)  # 0x7B: "{"
            kind = envelope["kind"]
            if kind == "record":
                return [(envelope["dev"], envelope["seq"])]
            if kind == "batch":
                return [(body["dev"], body["seq"]) for body in envelope["recs"]]
        except (ValueError, KeyError, TypeError, IndexError):
            return None
        return None

    def add(self, payload: bytes) -> int:
        """Count the records of one message; returns how many were new."""
        self._messages += 1
        ids = self._ids(payload)
        if ids is None or self._messages % self._verify_every == 1:
            decoded = [(r.device, r.seq) for r in self._decode(payload)]  # raises WireError on a bad payload
            if ids is not None and ids != decoded:
                raise BenchError(
                    f"fast envelope reader disagrees with fieldlink.wire.decode: {ids[:3]} != {decoded[:3]}"
                )
            ids = decoded
            self.verified += 1
        new = 0
        for device, seq in ids:
            seen = self._seen.get(device)
            if seen is None:
                seen = self._seen[device] = set()
            if seq in seen:
                self.duplicates += 1
            else:
                seen.add(seq)
                new += 1
        return new


# --- /proc I/O (added for bench/live.py) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcIO:
    """I/O counters of one process (all its threads) from /proc/PID/io, in bytes.

    ``write_bytes`` is what the process caused to be written to storage (counted when the
    page is dirtied, so a file written and deleted before writeback still counts);
    ``wchar`` is what went through write(2), writev(2), pwrite(2) and the like on any file
    descriptor (files, pipes, and sockets written that way); send(2) is not counted.
    """

    read_bytes: int
    write_bytes: int
    rchar: int
    wchar: int

    @classmethod
    def read(cls, pid: int) -> ProcIO:
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = int(value)
        return cls(fields["read_bytes"], fields["write_bytes"], fields["rchar"], fields["wchar"])


def mqtt_subscriber(port: int, topic_filter: str, client_id: str, on_message: Callable[..., None]) -> Any:
    """A paho client on the loopback broker, subscribed to ``topic_filter`` once this returns.

    Its network loop runs in its own thread; stop it with ``disconnect()`` and ``loop_stop()``.
    """
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: PLC0415

    subscribed = threading.Event()
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, protocol=MQTTProtocolVersion.MQTTv311
    )
    client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=0)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    client.connect(LOOPBACK, port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(15):
        client.disconnect()
        client.loop_stop()
        raise BenchError(f"no SUBACK from mosquitto for {topic_filter}")
    return client


def paho_connect(client_id: str, port: int, deadline: float, window: int = 20, *, clean_session: bool = True) -> Any:
    """A paho client (MQTT 3.1.1) connected to the loopback broker on ``port``, driven by loop() calls.

    ``window`` caps unacknowledged QoS 1 messages; nothing is queued beyond it.
    """
    import paho.mqtt.client as paho  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: PLC0415

    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    connected: list[bool] = []
    client.on_connect = lambda *_: connected.append(True)
    client.connect(LOOPBACK, port, keepalive=60)
    while not connected:
        if time.monotonic() > deadline:
            raise BenchError(f"{client_id}: no CONNACK from port {port}")
        client.loop(timeout=0.05)
    return client


@contextlib.contextmanager
def temp_dir(keep: bool, prefix: str) -> Iterator[Path]:
    """A temporary directory for a benchmark's servers, configs and logs; removed unless ``keep``."""
    tmp = Path(tempfile.mkdtemp(prefix=f"fieldlink-bench-{prefix}-"))
    try:
        yield tmp
    finally:
        if keep:
            print(f"\n(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def interrupt_on_sigterm() -> None:
    """SIGTERM stops a benchmark as Ctrl-C does: every server it started is stopped."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str, check: Callable[[], None] | None = None) -> str:
    """The next stdout line of a child; BenchError if it exits first or the timeout passes.
    ``check`` runs every half second while waiting (to fail early when something else died)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{what}: no answer within {timeout:.0f} s")
        ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.5))
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise BenchError(f"{what}: exited with code {proc.wait()} without answering")
            return line.decode().strip()
        if check is not None:
            check()
