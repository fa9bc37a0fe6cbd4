"""Live readings through the gateway to the cloud broker, against raw amqtt on this machine.

``make bench-live`` runs ``python -m bench.live``. Everything is on 127.0.0.1, every
process is started and stopped by this script through its own handle, and the temporary
directory is removed at the end. It measures:

1. **Raw amqtt QoS 1 throughput**: amqtt in its own process, embedded the way the gateway
   embeds it (``fieldlink.embedded_broker.EmbeddedBroker``, same plugins, uvloop through
   ``fieldlink.runner``), one paho publisher process and one paho subscriber process, both
   at QoS 1, with record-sized payloads. Messages/s end to end (publisher start to the
   last message received), median of ``--raw-repeats``.
2. **Gateway live throughput**, per durability mode: Debian mosquitto as the cloud broker
   (``max_queued_messages 0``), a paho subscriber on ``fl/#`` at QoS 1, and
   ``fieldlink-gateway run`` with its local broker on a free port, no sources, uplink to
   mosquitto. A paho publisher process sends record envelopes (``ts`` = now) to the
   gateway's local broker as fast as that broker acknowledges them (QoS 1, ``--window``
   unacknowledged); records/s arriving at the cloud subscriber (record or batch envelopes,
   distinct ``(device, seq)``), median of ``--gw-repeats``. The ratio is gateway records/s
   over raw amqtt messages/s.

   Raw and gateway runs take turns (raw, durable, spill, raw, ...), so that both meet the
   same neighbours on a shared machine. Because neighbours still skew the rates, the CPU
   time per message is reported too (raw broker; gateway process and its event-loop
   thread): it depends much less on how busy the machine is.
3. **Latency at half load**, per mode, on a fresh gateway: a paced publisher at half the
   raw amqtt rate for ``--latency-seconds``; per record, receive time minus record ``ts``
   (one machine, one clock): p50, p99, max. Also the gateway's CPU (% of one core), peak
   RSS (VmHWM) and bytes written (``/proc/PID/io`` ``write_bytes`` and ``wchar``) per
   payload byte published.

Durability modes are ``[buffer] durability = "durable" | "spill"``. A build that does not
know the key runs "durable" with the key left out (today every message is committed to
SQLite) and reports spill as not supported. The last line of stdout is
``live_ratio_vs_amqtt=<x>``: the ratio of the default mode, durable.

Publisher, subscriber and the raw broker are subcommands of this file (``_pub``, ``_sub``,
``_broker``) run as separate processes; each answers on stdout (``ready``, then one JSON
line). Shared helpers (mosquitto, /proc, percentiles) come from ``bench/_common.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    LOOPBACK,
    BenchError,
    Mosquitto,
    ProcIO,
    ProcStats,
    free_port,
    log_tail,
    median,
    paho_connect,
    percentile,
    port_accepts,
    read_line,
    spawn,
    stop_process,
    wait_until,
)

SITE = "bench"
GATEWAY = "gw-live"
MODES = ("durable", "spill")
DEFAULT_MODE = "durable"
GOAL_RATIO = 0.80
GOAL_P99_MS = 100.0
GOAL_RSS_MB = 60.0
READY = "ready"
WARM_UP_RECORDS = 200


# --- workers: amqtt broker, publisher, subscriber (each its own process) -------------------


def run_broker(args: argparse.Namespace) -> int:
    """amqtt as the gateway embeds it: EmbeddedBroker, same plugins, uvloop via run_async."""
    import asyncio  # noqa: PLC0415 (each worker imports what it uses)
    import logging  # noqa: PLC0415

    from fieldlink.embedded_broker import EmbeddedBroker  # noqa: PLC0415
    from fieldlink.runner import run_async  # noqa: PLC0415

    async def serve() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        # A tap that does nothing: the gateway's plugin path without the gateway behind it.
        broker = EmbeddedBroker(f"{LOOPBACK}:{args.port}", tap=lambda _client, _topic, _payload: None)
        await broker.start()
        print(READY, flush=True)
        await stop.wait()
        await broker.stop()

    logging.basicConfig(level=logging.WARNING)
    return run_async(serve(), logging.getLogger("bench.broker"))


def _record_maker(site: str, gateway: str, prefix: str, devices: int) -> Callable[[int], tuple[str, bytes]]:
    """(topic, record envelope) for message ``i``: devices in turn, ``ts`` = now."""
    from fieldlink.wire import Record, Value, encode_record  # noqa: PLC0415

    topics = [f"fl/{site}/{gateway}/dev/{prefix}{d}/telemetry" for d in range(devices)]

    def make(i: int) -> tuple[str, bytes]:
        device = i % devices
        values = {
            "temperature": Value.of(70.0 + (i % 250) / 10, "degC"),
            "pressure": Value.of(1.25, "bar"),
            "count": Value.of(i % 65536),
        }
        record = Record(site, gateway, f"{prefix}{device}", i + 1, time.time_ns() // 1_000_000, values)
        return topics[device], encode_record(record)

    return make


def run_publisher(args: argparse.Namespace) -> int:
    """Publish ``count`` records at QoS 1 with at most ``window`` unacknowledged, paced or flat out.

    One thread: publish() writes at once, loop() reads the PUBACKs. Prints one JSON line.
    """
    make = _record_maker(args.site, args.gateway, args.prefix, args.devices)
    deadline = time.monotonic() + args.deadline
    client = paho_connect(f"bench-pub-{os.getpid()}", args.port, deadline, args.window)
    acked = 0

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1

    client.on_publish = on_publish
    count, window, rate = args.count, args.window, args.rate
    sent = payload_bytes = 0
    worst_lag = 0.0  # paced: how late, at worst, a publish went out against its schedule
    start = last_publish = time.monotonic()
    while acked < count and time.monotonic() < deadline:
        now = time.monotonic()
        while sent < count and sent - acked < window:
            due = start + sent / rate if rate > 0 else now
            if due > now:
                break
            worst_lag = max(worst_lag, now - due)
            topic_name, payload = make(sent)
            client.publish(topic_name, payload, qos=1)
            payload_bytes += len(payload)
            sent += 1
            last_publish = time.monotonic()
        if rate <= 0 or sent >= count or sent - acked >= window:
            timeout = 0.05  # wake up on the next PUBACK
        else:
            timeout = max(0.0, min(0.05, start + sent / rate - time.monotonic()))
        client.loop(timeout=timeout)
    client.disconnect()
    result = {
        "sent": sent,
        "acked": acked,
        "payload_bytes": payload_bytes,
        "start": start,
        "last_publish": last_publish,
        "worst_lag_ms": round(worst_lag * 1000, 1),
    }
    print(json.dumps(result), flush=True)
    return 0


def run_subscriber(args: argparse.Namespace) -> int:
    """Subscribe at QoS 1; count messages (raw) or new records of our devices (gateway).

    Prints ``ready`` after the SUBACK, then one JSON line once ``count`` arrived, at the
    deadline, or after ``idle`` seconds without anything new.
    """
    from fieldlink.wire import WireError, decode  # noqa: PLC0415

    deadline = time.monotonic() + args.deadline
    client = paho_connect(f"bench-sub-{os.getpid()}", args.port, deadline)
    subscribed: list[bool] = []
    client.on_subscribe = lambda *_: subscribed.append(True)
    client.subscribe(args.filter, qos=1)
    while not subscribed:
        if time.monotonic() > deadline:
            raise BenchError("subscriber: no SUBACK")
        client.loop(timeout=0.05)

    received = duplicates = undecodable = 0
    first = last = 0.0
    seen: set[tuple[str, int]] = set()
    latencies_ms: list[float] = []

    def on_message(_client: object, _userdata: object, message: Any) -> None:
        nonlocal received, duplicates, undecodable, first, last
        now = time.monotonic()
        if args.raw:
            received += 1
        else:
            if not message.topic.endswith(("/telemetry", "/batch")):
                return  # status and health
            now_ms = time.time_ns() / 1e6
            try:
                records = decode(message.payload)
            except WireError:
                undecodable += 1
                return
            new = 0
            for record in records:
                if not record.device.startswith(args.prefix):
                    continue  # a straggler of an earlier run
                key = (record.device, record.seq)
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                latencies_ms.append(now_ms - record.ts)
                new += 1
            if not new:
                return
            received += new
        first = first or now
        last = now

    client.on_message = on_message
    print(READY, flush=True)
    while received < args.count and time.monotonic() < deadline:
        if first and time.monotonic() - last > args.idle:
            break
        client.loop(timeout=0.05)
    client.disconnect()
    result = {
        "received": received,
        "first": first,
        "last": last,
        "duplicates": duplicates,
        "undecodable": undecodable,
        "p50_ms": percentile(latencies_ms, 50),
        "p99_ms": percentile(latencies_ms, 99),
        "max_ms": max(latencies_ms, default=float("nan")),
    }
    print(json.dumps(result), flush=True)
    return 0


# --- the controller ------------------------------------------------------------------------


REPOSITORY = Path(__file__).resolve().parent.parent


def worker_argv(command: str, **options: object) -> list[str]:
    argv = [sys.executable, "-m", "bench.live", command]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


class Workers:
    """Worker processes answering on a stdout pipe; stderr goes to a log file each."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            # From the repository root, where ``-m bench.live`` is found, wherever we were started.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, cwd=REPOSITORY)
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> int:
        code = stop_process(proc, timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        self.running.remove(proc)
        return code

    def stop_all(self) -> None:
        for proc in reversed(self.running[:]):
            self.stop(proc)


@dataclass(frozen=True, slots=True)
class Sample:
    """CPU, memory and I/O of one process at one moment."""

    at: float
    stats: ProcStats
    io: ProcIO

    @classmethod
    def of(cls, pid: int) -> Sample:
        return cls(time.monotonic(), ProcStats.read(pid), ProcIO.read(pid))


@dataclass(frozen=True, slots=True)
class Flow:
    """One publisher-to-subscriber run."""

    sent: int
    received: int
    payload_bytes: int
    seconds: float  # publisher start to the last message received
    send_seconds: float  # publisher start to its last publish
    p50_ms: float
    p99_ms: float
    max_ms: float
    duplicates: int
    worst_lag_ms: float

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def sent_rate(self) -> float:
        return self.sent / self.send_seconds


@dataclass(slots=True)
class Runs:
    """Repeated flows through one process, and what that process spent on them."""

    rates: list[float] = field(default_factory=list)
    messages: int = 0
    seconds: float = 0.0  # wall time inside the runs (idle time between runs left out)
    cpu_s: float = 0.0  # the process, all threads
    loop_cpu_s: float = 0.0  # its main thread (the event loop)
    peak_rss: int = 0

    def add(self, flow: Flow, before: Sample, after: Sample) -> None:
        self.rates.append(flow.rate)
        self.messages += flow.received
        self.seconds += after.at - before.at
        self.cpu_s += after.stats.cpu - before.stats.cpu
        self.loop_cpu_s += after.stats.main_thread_cpu - before.stats.main_thread_cpu
        self.peak_rss = after.stats.peak_rss

    @property
    def median(self) -> float:
        return median(self.rates)

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_s / max(1e-9, self.seconds)

    @property
    def us_per_message(self) -> float:
        return 1e6 * self.cpu_s / max(1, self.messages)

    @property
    def loop_us_per_message(self) -> float:
        return 1e6 * self.loop_cpu_s / max(1, self.messages)


@dataclass(frozen=True, slots=True)
class Paced:
    """The half-load run of one mode, on a gateway started for it."""

    flow: Flow
    target_rate: float
    cpu_percent: float
    peak_rss: int
    write_bytes_per_byte: float
    wchar_per_byte: float


@dataclass(frozen=True, slots=True)
class Gateway:
    name: str
    pid: int
    port: int  # its local broker


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.workers = Workers(tmp)
        self.gateways: list[subprocess.Popen[bytes]] = []
        self.gateway_bin = Path(sys.executable).with_name("fieldlink-gateway")
        self._flows = 0
        self._told_no_key = False

    def stop_all(self) -> None:
        self.workers.stop_all()
        for proc in self.gateways:
            stop_process(proc, timeout=15)

    # --- one flow: subscriber, then publisher ------------------------------------------

    def flow(self, *, pub_port: int, sub_port: int, count: int, rate: float, raw: bool, timeout: float) -> Flow:
        """Start a subscriber, wait for its SUBACK, publish ``count``, collect both answers."""
        self._flows += 1
        prefix = f"f{self._flows}-d"  # device names of this flow only
        sub = self.workers.start(
            f"sub-{self._flows}",
            worker_argv(
                "_sub",
                port=sub_port,
                filter="fl/#",
                count=count,
                deadline=timeout,
                idle=15,
                prefix=prefix,
                raw=int(raw),
            ),
        )
        try:
            if read_line(sub, 15, "subscriber") != READY:
                raise BenchError("subscriber: unexpected answer")
            pub = self.workers.start(
                f"pub-{self._flows}",
                worker_argv(
                    "_pub",
                    port=pub_port,
                    count=count,
                    rate=rate,
                    window=self.args.window,
                    devices=self.args.devices,
                    prefix=prefix,
                    site=SITE,
                    gateway="raw" if raw else GATEWAY,
                    deadline=timeout,
                ),
            )
            try:
                published = json.loads(read_line(pub, timeout + 10, "publisher"))
            finally:
                self.workers.stop(pub)
            got = json.loads(read_line(sub, timeout + 10, "subscriber"))
        finally:
            self.workers.stop(sub)
        if published["acked"] < count:
            print(f"  ! the publisher got {published['acked']} of {count} PUBACKs within {timeout:.0f} s")
        if got["received"] < published["acked"]:
            print(f"  ! the subscriber got {got['received']} of {published['acked']} within {timeout:.0f} s")
        return Flow(
            sent=published["sent"],
            received=got["received"],
            payload_bytes=published["payload_bytes"],
            seconds=max(0.0, got["last"] - published["start"]),
            send_seconds=max(1e-9, published["last_publish"] - published["start"]),
            p50_ms=got["p50_ms"],
            p99_ms=got["p99_ms"],
            max_ms=got["max_ms"],
            duplicates=got["duplicates"],
            worst_lag_ms=published["worst_lag_ms"],
        )

    def measured(self, pid: int, runs: Runs, **flow_args: Any) -> Flow:
        before = Sample.of(pid)
        flow = self.flow(**flow_args)
        runs.add(flow, before, Sample.of(pid))
        return flow

    # --- processes under test ----------------------------------------------------------

    @contextmanager
    def raw_broker(self) -> Iterator[tuple[int, int]]:
        """(pid, port) of amqtt embedded as the gateway embeds it, in a process of its own."""
        port = free_port()
        broker = self.workers.start("amqtt", worker_argv("_broker", port=port))
        try:
            if read_line(broker, 30, "amqtt broker") != READY:
                raise BenchError("amqtt broker: unexpected answer")
            yield broker.pid, port
        finally:
            self.workers.stop(broker)

    def write_config(self, name: str, mode: str, local_port: int, cloud_port: int, *, explicit: bool) -> Path:
        durability = f'durability = "{mode}"' if explicit else "# durability: not known to this build"
        path = self.tmp / f"{name}.toml"
        path.write_text(f"""
[gateway]
site = "{SITE}"
id = "{GATEWAY}"
state_dir = "{self.tmp / name}"
drain_timeout = "1s"

[local_broker]
bind = "{LOOPBACK}:{local_port}"

[buffer]
{durability}

[uplink]
url = "mqtt://{LOOPBACK}:{cloud_port}"
client_id = "{name}"
reconnect_min = "100ms"
reconnect_max = "500ms"
""")
        return path

    def check_config(self, path: Path) -> tuple[bool, str]:
        done = subprocess.run(
            [str(self.gateway_bin), "check-config", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        return done.returncode == 0, (done.stdout + done.stderr).strip()

    def config_for(self, name: str, mode: str, local_port: int, cloud_port: int) -> Path | None:
        """A config this build accepts for ``mode``; None if the build has no such mode."""
        path = self.write_config(name, mode, local_port, cloud_port, explicit=True)
        ok, output = self.check_config(path)
        if ok:
            return path
        if mode == DEFAULT_MODE and "buffer.durability" in output:
            # A build before the key: every message is committed to SQLite, which is durable.
            path = self.write_config(name, mode, local_port, cloud_port, explicit=False)
            ok, output = self.check_config(path)
            if ok:
                if not self._told_no_key:
                    print(f"  (this build has no buffer.durability key: {mode} is its only mode)")
                    self._told_no_key = True
                return path
        if mode == DEFAULT_MODE:
            raise BenchError(f"the gateway refuses its {mode} config:\n{output}")
        print(f"  ({mode}: check-config says {output.splitlines()[-1] if output else 'no'})")
        return None

    @contextmanager
    def gateway(self, name: str, mode: str, cloud_port: int) -> Iterator[Gateway | None]:
        """A running gateway in ``mode``, warmed up end to end; None if this build lacks the mode.

        Lacking means: check-config refuses the config, or ``run`` exits with 2 (config error).
        """
        local_port = free_port()
        config = self.config_for(name, mode, local_port, cloud_port)
        if config is None:
            yield None
            return
        log_path = self.tmp / f"{name}.log"
        proc = spawn([str(self.gateway_bin), "run", "--config", str(config)], log_path)
        self.gateways.append(proc)
        try:
            wait_until(f"gateway {name}", lambda: proc.poll() is not None or port_accepts(LOOPBACK, local_port), 30)
            if proc.poll() == 2 and mode != DEFAULT_MODE:
                print(f"  ({mode}: the gateway refused the config: {log_tail(log_path, 1)})")
                yield None
                return
            if proc.poll() is not None:
                raise BenchError(f"gateway {name} exited with {proc.returncode}:\n{log_tail(log_path)}")
            # The whole path once (buffer open, uplink connected) before anything is measured.
            warm = self.flow(
                pub_port=local_port, sub_port=cloud_port, count=WARM_UP_RECORDS, rate=0, raw=False, timeout=60
            )
            if warm.received < WARM_UP_RECORDS:
                raise BenchError(f"gateway {name}: {warm.received} of {WARM_UP_RECORDS} warm-up records arrived")
            yield Gateway(name, proc.pid, local_port)
        finally:
            code = stop_process(proc, timeout=15)
            self.gateways.remove(proc)
            if code != 0:
                print(f"  ! gateway {name} exited with {code}; log:\n{log_tail(log_path, 10)}")

    # --- 1 and 2: flat out, raw amqtt and gateways taking turns ------------------------

    def flat_out(self, modes: list[str], cloud_port: int) -> tuple[Runs, dict[str, Runs | None]]:
        """Raw amqtt runs and gateway runs in turn, so that both meet the same neighbours on the machine."""
        args = self.args
        raw = Runs()
        gateways: dict[str, Runs | None] = {}
        with ExitStack() as stack:
            raw_pid, raw_port = stack.enter_context(self.raw_broker())
            running: dict[str, Gateway] = {}
            for mode in modes:
                gateway = stack.enter_context(self.gateway(f"gw-{mode}-flat", mode, cloud_port))
                gateways[mode] = None if gateway is None else Runs()
                if gateway is not None:
                    running[mode] = gateway
            for i in range(max(args.raw_repeats, args.gw_repeats)):
                if i < args.raw_repeats:
                    flow = self.measured(
                        raw_pid,
                        raw,
                        pub_port=raw_port,
                        sub_port=raw_port,
                        count=args.raw_count,
                        rate=0,
                        raw=True,
                        timeout=120,
                    )
                    print(
                        f"  raw amqtt, run {i + 1}: {flow.received:,}/{flow.sent:,} messages in {flow.seconds:.2f} s "
                        f"= {flow.rate:,.0f} msg/s"
                    )
                for mode, gateway in running.items() if i < args.gw_repeats else ():
                    runs = gateways[mode]
                    assert runs is not None
                    flow = self.measured(
                        gateway.pid,
                        runs,
                        pub_port=gateway.port,
                        sub_port=cloud_port,
                        count=args.gw_count,
                        rate=0,
                        raw=False,
                        timeout=120,
                    )
                    print(
                        f"  {mode}, run {i + 1}: {flow.received:,}/{flow.sent:,} records in {flow.seconds:.2f} s = "
                        f"{flow.rate:,.0f} records/s (local broker took {flow.sent_rate:,.0f}/s; "
                        f"latency p50 {flow.p50_ms:,.0f} ms, p99 {flow.p99_ms:,.0f} ms; duplicates {flow.duplicates})"
                    )
        return raw, gateways

    # --- 3: half load ------------------------------------------------------------------

    def paced(self, mode: str, cloud_port: int, rate: float) -> Paced | None:
        with self.gateway(f"gw-{mode}-paced", mode, cloud_port) as gateway:
            if gateway is None:
                return None
            before = Sample.of(gateway.pid)
            flow = self.flow(
                pub_port=gateway.port,
                sub_port=cloud_port,
                count=max(1, round(rate * self.args.latency_seconds)),
                rate=rate,
                raw=False,
                timeout=self.args.latency_seconds + 60,
            )
            after = Sample.of(gateway.pid)
        payload = max(1, flow.payload_bytes)
        return Paced(
            flow=flow,
            target_rate=rate,
            cpu_percent=100.0 * (after.stats.cpu - before.stats.cpu) / max(1e-9, after.at - before.at),
            peak_rss=after.stats.peak_rss,
            write_bytes_per_byte=(after.io.write_bytes - before.io.write_bytes) / payload,
            wchar_per_byte=(after.io.wchar - before.io.wchar) / payload,
        )


# --- report --------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def print_flat_out(raw: Runs, gateways: dict[str, Runs | None]) -> None:
    print(
        f"  raw amqtt: median {raw.median:,.0f} msg/s; broker CPU {raw.cpu_percent:.0f} % of a core, "
        f"{raw.us_per_message:.0f} us per message; VmHWM {mb(raw.peak_rss)}"
    )
    for mode, runs in gateways.items():
        if runs is None:
            print(f"  {mode}: n/a (not supported by this build)")
            continue
        print(
            f"  {mode}: median {runs.median:,.0f} records/s = {runs.median / raw.median:.2f} x raw amqtt; gateway CPU "
            f"{runs.cpu_percent:.0f} % of a core, {runs.us_per_message:.0f} us per record "
            f"(event loop {runs.loop_us_per_message:.0f} us); VmHWM {mb(runs.peak_rss)}"
        )


def print_paced(mode: str, result: Paced | None) -> None:
    if result is None:
        print(f"  {mode}: n/a (not supported by this build)")
        return
    flow = result.flow
    print(
        f"  {mode}: target {result.target_rate:,.0f} records/s, sent {flow.sent_rate:,.0f}/s (at worst "
        f"{flow.worst_lag_ms:,.0f} ms behind schedule), delivered {flow.rate:,.0f}/s; "
        f"{flow.received:,}/{flow.sent:,} records; latency p50 {flow.p50_ms:,.1f} ms, "
        f"p99 {flow.p99_ms:,.1f} ms, max {flow.max_ms:,.1f} ms"
    )
    if flow.rate < 0.95 * flow.sent_rate:
        print("  ! the gateway did not keep up with the offered rate: these latencies are mostly its backlog")
    print(
        f"  {mode}: gateway CPU {result.cpu_percent:.0f} % of a core, VmHWM {mb(result.peak_rss)}; per payload "
        f"byte {result.write_bytes_per_byte:.2f} B written to storage (write_bytes) and {result.wchar_per_byte:.2f} B "
        f"through write(2)-family calls (wchar: files, and sockets written by uvloop; not send(2)); "
        f"{flow.payload_bytes / max(1, flow.sent):.0f} B per record"
    )


def print_summary(raw: Runs, gateways: dict[str, Runs | None], paced: dict[str, Paced | None], took: float) -> None:
    one, five, _ = os.getloadavg()
    print(f"\n=== summary: medians; {took:.0f} s; {os.cpu_count()} cores, load {one:.1f} / {five:.1f} ===")
    print(
        f"raw amqtt QoS 1:   {raw.median:,.0f} msg/s (runs {', '.join(f'{r:,.0f}' for r in raw.rates)}); "
        f"broker {raw.us_per_message:.0f} us CPU per message"
    )
    for mode, runs in gateways.items():
        result = paced.get(mode)
        if runs is None or result is None:
            print(f"{mode + ':':<18} n/a (not supported by this build)")
            continue
        flow = result.flow
        ratio = runs.median / raw.median
        print(
            f"{mode + ':':<18} {runs.median:,.0f} records/s = {ratio:.2f} x raw "
            f"[{verdict(ratio >= GOAL_RATIO)}: >= {GOAL_RATIO:.2f}]; {runs.us_per_message:.0f} us CPU per record, "
            f"event loop {runs.loop_us_per_message:.0f} us (raw broker / loop = "
            f"{raw.us_per_message / max(1e-9, runs.loop_us_per_message):.2f})"
        )
        print(
            f"{'':<18} at {result.target_rate:,.0f}/s: p50 {flow.p50_ms:,.1f} ms, p99 {flow.p99_ms:,.1f} ms "
            f"[{verdict(flow.p99_ms <= GOAL_P99_MS)}: <= {GOAL_P99_MS:.0f}], CPU {result.cpu_percent:.0f} %, "
            f"VmHWM {mb(result.peak_rss)} [{verdict(result.peak_rss <= GOAL_RSS_MB * 2**20)}: <= {GOAL_RSS_MB:.0f}] "
            f"(flat out {mb(runs.peak_rss)}); per payload byte {result.write_bytes_per_byte:.2f} B write_bytes, "
            f"{result.wchar_per_byte:.2f} B wchar"
        )
    default = gateways.get(DEFAULT_MODE)
    print(f"live_ratio_vs_amqtt={default.median / raw.median if default else float('nan'):.2f}")


def controller(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="fieldlink-bench-live-"))
    bench = Bench(args, tmp)
    started = time.monotonic()
    mosquitto = Mosquitto(tmp / "mosquitto", persistence=False)
    paced: dict[str, Paced | None] = {}
    try:
        mosquitto.start()
        print(
            f"flat out, taking turns: raw amqtt QoS 1 ({args.raw_count:,} messages x {args.raw_repeats}, "
            f"EmbeddedBroker on uvloop) and the gateway in {', '.join(modes)} ({args.gw_count:,} records x "
            f"{args.gw_repeats}); publisher window {args.window}:"
        )
        raw, gateways = bench.flat_out(modes, mosquitto.port)
        print_flat_out(raw, gateways)
        rate = raw.median / 2
        print(f"\nhalf load: {rate:,.0f} records/s for {args.latency_seconds:g} s, on a fresh gateway per mode:")
        for mode in modes:
            paced[mode] = None if gateways.get(mode) is None else bench.paced(mode, mosquitto.port, rate)
            print_paced(mode, paced[mode])
    except BenchError as exc:
        hint = "" if args.keep_temp else " (--keep-temp keeps the logs)"
        print(f"bench-live failed: {exc}{hint}", file=sys.stderr)
        return 1
    finally:
        bench.stop_all()
        mosquitto.stop()
        if args.keep_temp:
            print(f"\n(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print_summary(raw, gateways, paced, time.monotonic() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], allow_abbrev=False)
    parser.add_argument("--raw-count", type=int, default=30_000, help="messages per raw amqtt run")
    parser.add_argument("--raw-repeats", type=int, default=3)
    parser.add_argument("--gw-count", type=int, default=10_000, help="records per flat-out gateway run")
    parser.add_argument("--gw-repeats", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="length of the half-load run")
    parser.add_argument("--window", type=int, default=50, help="QoS 1 messages a publisher keeps unacknowledged")
    parser.add_argument("--devices", type=int, default=4, help="devices the publisher takes turns with")
    parser.add_argument("--modes", default=",".join(MODES), help="durability modes, comma-separated")
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs, and say where")
    workers = parser.add_subparsers(dest="worker", help=argparse.SUPPRESS)

    broker = workers.add_parser("_broker", allow_abbrev=False)
    broker.add_argument("--port", type=int, required=True)

    pub = workers.add_parser("_pub", allow_abbrev=False)
    pub.add_argument("--port", type=int, required=True)
    pub.add_argument("--count", type=int, required=True)
    pub.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: as fast as acknowledged")
    pub.add_argument("--window", type=int, default=50)
    pub.add_argument("--devices", type=int, default=4)
    pub.add_argument("--prefix", default="d")
    pub.add_argument("--site", default=SITE)
    pub.add_argument("--gateway", default=GATEWAY)
    pub.add_argument("--deadline", type=float, default=120)

    sub = workers.add_parser("_sub", allow_abbrev=False)
    sub.add_argument("--port", type=int, required=True)
    sub.add_argument("--filter", default="fl/#")
    sub.add_argument("--count", type=int, required=True)
    sub.add_argument("--deadline", type=float, default=120)
    sub.add_argument("--idle", type=float, default=15)
    sub.add_argument("--prefix", default="")
    sub.add_argument("--raw", type=int, default=0, help="1: count messages, do not decode")

    args = parser.parse_args(argv)
    if args.worker == "_broker":
        return run_broker(args)
    if args.worker == "_pub":
        return run_publisher(args)
    if args.worker == "_sub":
        return run_subscriber(args)
    return controller(args)


if __name__ == "__main__":
    sys.exit(main())
