"""Modbus acquisition: a fleet of simulated devices on one gateway, and one connection against raw pymodbus.

``make bench-acquisition`` runs ``python -m bench.acquisition``. Everything is on 127.0.0.1;
every process is started and stopped by this script through its own handle, and the
temporary directory is removed at the end (``--keep-temp`` keeps configs and logs). It measures:

1. **Fleet**: ``firmware-sim run`` in its own process with ``--devices`` Modbus TCP servers
   (one device each, ``--tags`` tags of float32, int16 and uint16 on sine and ramp signals,
   all in one read), Debian mosquitto as the cloud broker, and ``fieldlink-gateway run`` with
   one ``modbus_tcp`` source per device (poll_interval 1 s, every tag reported every poll,
   default durable buffer, local broker on). After every device is online and a warm-up,
   ``--duration`` seconds are measured between two of the gateway's own health reports
   (``--health-interval``), read on mosquitto:

   - achieved readings/s = delta ``readings_published`` / delta health ``ts`` (counters the
     gateway keeps anyway: nothing extra runs in the gateway to count), against the
     configured ``devices / 1 s``; values/s = readings/s x tags. Each device's own rate comes
     from its ``responses`` counter (``sources.<name>.devices.<device>``);
   - end to end: the records that reached mosquitto with ``ts`` in the window (a QoS 0
     subscriber in this process, decoding with ``fieldlink.wire.decode``), and the
     poll-interval jitter: per device, the gaps between consecutive record timestamps
     (``ts`` is taken when the poll starts), p50 / p99 / max;
   - gateway CPU (``/proc/PID/stat`` utime + stime over the window, % of one core), its peak
     RSS (VmHWM), and the simulator's and mosquitto's CPU for context.

2. **One connection**: a fresh simulator process with a single device (same tags, one read
   covers them), and in this process, on uvloop as in the gateway, taking turns for
   ``--rounds`` rounds of ``--round-seconds``:

   (a) raw pymodbus: ``AsyncModbusTcpClient.read_holding_registers`` of the same registers,
       back to back, on one connection: reads/s;
   (b) the gateway's ``ModbusSource`` polling the same device with a 1 us poll interval (its
       scheduler then polls back to back), into a sink that counts readings: reads/s from
       the device's ``responses`` counter.

   Medians are quoted (the machine is shared). CPU microseconds per read of this process
   (client side) and of the simulator are shown too: the simulator serves both, so it
   bounds both rates, and the client CPU per read is the steadier comparison.
   ``--profile`` adds one cProfile'd round of each and prints where the time goes.

The last line of stdout is ``acquisition_ratio_vs_raw_pymodbus=<x>``: the gateway's
per-connection reads/s over raw pymodbus', as the median of per-round ratios (each
gateway round against the raw round next to it). Goals: the fleet keeps the configured
rate, and the ratio is at least 0.80.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    LOOPBACK,
    BenchError,
    Mosquitto,
    ProcStats,
    free_port,
    interrupt_on_sigterm,
    log_tail,
    median,
    mqtt_subscriber,
    percentile,
    port_accepts,
    spawn,
    stop_process,
    temp_dir,
    wait_until,
)

SITE = "bench"
GATEWAY = "gw-acq"
POLL_INTERVAL_S = 1.0
GOAL_RATIO = 0.80
GOAL_RATE_SHARE = 0.99  # achieved / configured readings/s that counts as keeping the rate
SLOW_DEVICE_SHARE = 0.95  # a device below this share of its configured rate is listed
FAST_POLL_S = 1e-6  # the gateway's poll interval in the per-connection runs: back to back
BIN = Path(sys.executable).parent


# --- the device: tags in the simulator and in the gateway ----------------------------------


@dataclass(frozen=True, slots=True)
class Tag:
    name: str
    type: str  # float32 | int16 | uint16
    address: int
    scale: float
    signal: str  # TOML inline table for the simulator

    @property
    def width(self) -> int:
        return 2 if self.type == "float32" else 1


def make_tags(count: int) -> list[Tag]:
    """``count`` tags at consecutive addresses: float32 sines, scaled int16 sines, uint16 ramps."""
    tags: list[Tag] = []
    address = 0
    for i in range(count):
        kind = i % 3
        if kind == 0:
            signal = f'{{ kind = "sine", offset = {50 + i}.0, amplitude = 5.0, period = "{20 + i}s", noise = 0.1 }}'
            tag = Tag(f"f{i}", "float32", address, 1.0, signal)
        elif kind == 1:
            signal = f'{{ kind = "sine", offset = 10.0, amplitude = 5.0, period = "30s", phase = "{i}s" }}'
            tag = Tag(f"s{i}", "int16", address, 0.1, signal)
        else:
            signal = f'{{ kind = "ramp", start = 0, slope = {1 + i}, min = 0, max = 1000 }}'
            tag = Tag(f"u{i}", "uint16", address, 1.0, signal)
        tags.append(tag)
        address += tag.width
    return tags


def register_span(tags: list[Tag]) -> int:
    return max(t.address + t.width for t in tags)


def sim_config(name: str, base_port: int, count: int, tags: list[Tag]) -> str:
    lines = [
        "seed = 1",
        "[[servers]]",
        f'name = "{name}"',
        f'host = "{LOOPBACK}"',
        f"port = {base_port}",
        f"count = {count}",
        "  [[servers.devices]]",
        "  unit = 1",
    ]
    for tag in tags:
        lines += [
            "    [[servers.devices.registers]]",
            f"    address = {tag.address}",
            f'    type = "{tag.type}"',
            f"    scale = {tag.scale}",
            f'    name = "{tag.name}"',
            f"    signal = {tag.signal}",
        ]
    return "\n".join(lines) + "\n"


def gateway_registers(tags: list[Tag]) -> list[dict[str, Any]]:
    """The tags as the gateway's config has them (every poll reported)."""
    out: list[dict[str, Any]] = []
    for tag in tags:
        register: dict[str, Any] = {"name": tag.name, "address": tag.address, "type": tag.type}
        if tag.scale != 1.0:
            register["scale"] = tag.scale
        out.append(register)
    return out


def _toml_inline(register: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in register.items()) + " }"


def gateway_config(
    tmp: Path, *, local_port: int, cloud_port: int, base_port: int, devices: int, tags: list[Tag], health: float
) -> str:
    registers = ",\n  ".join(_toml_inline(r) for r in gateway_registers(tags))
    text = f"""
[gateway]
site = "{SITE}"
id = "{GATEWAY}"
state_dir = "{tmp / "gateway-state"}"
health_interval = {health}
drain_timeout = "1s"

[local_broker]
bind = "{LOOPBACK}:{local_port}"

[uplink]
url = "mqtt://{LOOPBACK}:{cloud_port}"
client_id = "{GATEWAY}"
reconnect_min = "100ms"
reconnect_max = "500ms"
"""
    for i in range(devices):
        text += f"""
[[sources]]
kind = "modbus_tcp"
name = "sim-{i}"
host = "{LOOPBACK}"
port = {base_port + i}
timeout = "1s"

  [[sources.devices]]
  name = "dev-{i}"
  unit = 1
  poll_interval = "{POLL_INTERVAL_S:g}s"
  registers = [
  {registers}
  ]
"""
    return text


# --- processes -------------------------------------------------------------------------------


def free_port_block(count: int, attempts: int = 100) -> int:
    """A first port ``p`` such that ``p .. p + count - 1`` can all be bound now (below the ephemeral range)."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, 32000 - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((LOOPBACK, port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise BenchError(f"no block of {count} free ports found")


class Processes:
    """Processes this benchmark started, stopped in reverse order (on failure and Ctrl-C too)."""

    def __init__(self) -> None:
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        proc = spawn(argv, log_path)
        self.running.append((name, proc, log_path))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
        for entry in self.running:
            if entry[1] is proc:
                self.running.remove(entry)
                break
        return stop_process(proc, timeout)

    def stop_all(self) -> None:
        while self.running:
            _, proc, _ = self.running.pop()
            with contextlib.suppress(Exception):
                stop_process(proc, timeout=15)


def start_sim(procs: Processes, tmp: Path, name: str, *, base_port: int, count: int, tags: list[Tag]) -> Any:
    config = tmp / f"{name}.toml"
    config.write_text(sim_config(name, base_port, count, tags))
    log_path = tmp / f"{name}.log"
    proc = procs.start(name, [str(BIN / "firmware-sim"), "run", "--config", str(config)], log_path)
    last = base_port + count - 1  # servers start in order: the last one listening means all are

    def ready() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"firmware-sim exited with {proc.returncode}:\n{log_tail(log_path)}")
        return port_accepts(LOOPBACK, last)

    wait_until(f"firmware-sim ({count} servers from port {base_port})", ready, 60 + count * 0.2)
    return proc


def cpu_of(pid: int) -> float:
    try:
        return ProcStats.read(pid).cpu
    except OSError:
        return float("nan")


# --- 1: the fleet ----------------------------------------------------------------------------


@dataclass(slots=True)
class Health:
    arrived: float  # time.monotonic() when it reached us
    body: dict[str, Any]
    gateway_cpu: float
    sim_cpu: float
    broker_cpu: float


class CloudWatcher:
    """QoS 0 subscriber on mosquitto (``fl/#``): the gateway's health reports and its records.

    CPU of the processes under test is read the moment a health report arrives, so the CPU
    window and the counter window are the same.
    """

    def __init__(self, port: int, pids: dict[str, int]) -> None:

        from fieldlink.wire import WireError, decode  # noqa: PLC0415

        self._decode, self._wire_error = decode, WireError
        self.pids = pids
        self.health: list[Health] = []
        self.records: list[tuple[str, int, int, int]] = []  # (device, seq, ts, values)
        self.undecodable = 0
        self._prefix = f"fl/{SITE}/{GATEWAY}/"
        self.client = mqtt_subscriber(port, "fl/#", f"bench-acq-{os.getpid()}", self._on_message)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _client: object, _userdata: object, message: Any) -> None:
        name = message.topic
        if not name.startswith(self._prefix):
            return
        if name.endswith("/health"):
            self.health.append(
                Health(
                    time.monotonic(),
                    json.loads(message.payload),
                    cpu_of(self.pids["gateway"]),
                    cpu_of(self.pids["sim"]),
                    cpu_of(self.pids["mosquitto"]),
                )
            )
        elif name.endswith(("/telemetry", "/batch")):
            try:
                records = self._decode(message.payload)
            except self._wire_error:
                self.undecodable += 1
                return
            self.records.extend((r.device, r.seq, r.ts, len(r.values)) for r in records)

    def health_after(self, after: float, timeout: float) -> Health:
        """The first health report that arrives after ``after`` (monotonic)."""
        deadline = time.monotonic() + timeout
        while True:
            for report in reversed(self.health):
                if report.arrived > after:
                    earlier = [h for h in self.health if h.arrived > after]
                    return earlier[0] if earlier else report
            if time.monotonic() > deadline:
                raise BenchError(f"no gateway health report within {timeout:.0f} s")
            time.sleep(0.05)


@dataclass(slots=True)
class FleetResult:
    devices: int
    tags: int
    seconds: float  # a whole number of poll intervals
    readings: int  # records at the cloud broker stamped in the window
    configured_rate: float
    counter_readings: int  # readings_published between the two health reports
    counter_seconds: float
    gateway_cpu: float  # % of one core
    sim_cpu: float
    broker_cpu: float
    peak_rss: int
    device_rates: list[float]
    values: int
    gaps_ms: list[float]
    timeouts: int
    latency_p50_ms: float  # median over devices of their p50
    latency_p99_ms: float  # worst device p99
    undecodable: int
    dropped: int

    @property
    def rate(self) -> float:
        return self.readings / self.seconds

    @property
    def share(self) -> float:
        return self.rate / self.configured_rate


def _device_counters(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for source in body.get("sources", {}).values():
        out.update(source.get("devices", {}))
    return out


def run_fleet(args: argparse.Namespace, tmp: Path, procs: Processes, tags: list[Tag]) -> FleetResult:
    devices = args.devices
    mosquitto = Mosquitto(tmp / "mosquitto", persistence=False)
    watcher: CloudWatcher | None = None
    try:
        mosquitto.start()
        base_port = free_port_block(devices)
        sim = start_sim(procs, tmp, "fleet-sim", base_port=base_port, count=devices, tags=tags)
        local_port = free_port()
        config = tmp / "gateway.toml"
        config.write_text(
            gateway_config(
                tmp,
                local_port=local_port,
                cloud_port=mosquitto.port,
                base_port=base_port,
                devices=devices,
                tags=tags,
                health=args.health_interval,
            )
        )
        log_path = tmp / "gateway.log"
        watcher = CloudWatcher(mosquitto.port, {"gateway": 0, "sim": sim.pid, "mosquitto": mosquitto.pid})
        started = time.monotonic()
        gateway = procs.start("gateway", [str(BIN / "fieldlink-gateway"), "run", "--config", str(config)], log_path)
        watcher.pids["gateway"] = gateway.pid

        def listening() -> bool:
            if gateway.poll() is not None:
                raise BenchError(f"gateway exited with {gateway.returncode}:\n{log_tail(log_path)}")
            return port_accepts(LOOPBACK, local_port)

        wait_until("gateway local broker", listening, 60)

        def all_online() -> bool:
            if gateway.poll() is not None:
                raise BenchError(f"gateway exited with {gateway.returncode}:\n{log_tail(log_path)}")
            return len({r[0] for r in watcher.records[-4 * devices :]}) >= devices

        wait_until(f"records of all {devices} devices at the cloud broker", all_online, 60)
        print(f"  all {devices} devices reporting {time.monotonic() - started:.1f} s after the gateway started")
        time.sleep(args.warm_up)
        first = watcher.health_after(time.monotonic(), args.health_interval + 10)
        print(f"  window starts at a health report; measuring {args.duration:g} s ...", flush=True)
        while time.monotonic() < first.arrived + args.duration - 0.5:
            time.sleep(0.2)
            if gateway.poll() is not None:
                raise BenchError(f"gateway exited with {gateway.returncode}:\n{log_tail(log_path)}")
        last = watcher.health_after(time.monotonic(), args.health_interval + 10)
        peak_rss = ProcStats.read(gateway.pid).peak_rss
        time.sleep(3.0)  # records of the window still on their way to the cloud
    finally:
        if watcher is not None:
            watcher.stop()
        procs.stop_all()
        code = mosquitto.stop()
        if code not in (0, None):
            print(f"  ! mosquitto exited with {code}")

    # Readings are counted by their own timestamps (taken as each poll starts) in a window of
    # a whole number of poll intervals: a device polling on time has exactly that many
    # readings in it, whatever its phase. Counter deltas between two health reports would
    # be off by up to one poll per device at the edges (all devices start in step).
    start_ts = first.body["ts"]
    periods = int((last.body["ts"] - start_ts) / 1000 / POLL_INTERVAL_S)
    seconds = periods * POLL_INTERVAL_S
    end_ts = start_ts + round(seconds * 1000)
    wall = last.arrived - first.arrived
    counter_seconds = (last.body["ts"] - start_ts) / 1000
    before, after = _device_counters(first.body), _device_counters(last.body)
    timeouts = sum(after[d]["timeouts"] - before.get(d, {}).get("timeouts", 0) for d in after)
    p50s = [c["latency_ms"]["p50"] for c in after.values() if c["latency_ms"]["p50"] is not None]
    p99s = [c["latency_ms"]["p99"] for c in after.values() if c["latency_ms"]["p99"] is not None]
    records = sorted({(dev, seq): (ts, n) for dev, seq, ts, n in watcher.records}.items())
    per_device: dict[str, int] = {f"dev-{i}": 0 for i in range(devices)}
    values = 0
    gaps: list[float] = []
    previous: tuple[str, int] | None = None
    for (dev, _seq), (ts, n) in records:
        inside = start_ts <= ts < end_ts
        if inside:
            per_device[dev] = per_device.get(dev, 0) + 1
            values += n
            if previous is not None and previous[0] == dev:
                gaps.append(ts - previous[1])
        previous = (dev, ts)
    return FleetResult(
        devices=devices,
        tags=len(tags),
        seconds=seconds,
        readings=sum(per_device.values()),
        configured_rate=devices / POLL_INTERVAL_S,
        counter_readings=last.body["readings_published"] - first.body["readings_published"],
        counter_seconds=counter_seconds,
        gateway_cpu=100 * (last.gateway_cpu - first.gateway_cpu) / wall,
        sim_cpu=100 * (last.sim_cpu - first.sim_cpu) / wall,
        broker_cpu=100 * (last.broker_cpu - first.broker_cpu) / wall,
        peak_rss=peak_rss,
        device_rates=[n / seconds for n in per_device.values()],
        values=values,
        gaps_ms=gaps,
        timeouts=timeouts,
        latency_p50_ms=median(p50s),
        latency_p99_ms=max(p99s, default=float("nan")),
        undecodable=watcher.undecodable,
        dropped=last.body["readings_dropped"] - first.body["readings_dropped"],
    )


def print_fleet(result: FleetResult) -> None:
    r = result
    slow = sorted(rate for rate in r.device_rates if rate < SLOW_DEVICE_SHARE / POLL_INTERVAL_S)
    print(
        f"  achieved {r.rate:,.1f} readings/s of {r.configured_rate:,.0f} configured ({100 * r.share:.1f} %) = "
        f"{r.values / r.seconds:,.0f} values/s of {r.configured_rate * r.tags:,.0f}: {r.readings:,} records at "
        f"the cloud broker stamped in {r.seconds:g} s"
    )
    print(
        f"  gateway counters: {r.counter_readings:,} readings_published in {r.counter_seconds:.1f} s between the "
        f"health reports = {r.counter_readings / r.counter_seconds:,.1f}/s (edges: +-1 poll per device); "
        f"readings dropped {r.dropped}, undecodable at the broker {r.undecodable}"
    )
    print(
        f"  per device: min {min(r.device_rates, default=float('nan')):.2f}, median "
        f"{median(r.device_rates):.2f} readings/s; {len(slow)} of {r.devices} below "
        f"{SLOW_DEVICE_SHARE / POLL_INTERVAL_S:.2f}/s; timeouts {r.timeouts}; request latency p50 "
        f"{r.latency_p50_ms:.1f} ms (median device), p99 {r.latency_p99_ms:.1f} ms (worst device)"
    )
    print(
        f"  poll interval (gaps between a device's record timestamps): p50 {percentile(r.gaps_ms, 50):,.0f} ms, "
        f"p99 {percentile(r.gaps_ms, 99):,.0f} ms, max {max(r.gaps_ms, default=float('nan')):,.0f} ms "
        f"({len(r.gaps_ms):,} gaps)"
    )
    print(
        f"  gateway CPU {r.gateway_cpu:.1f} % of one core ({1e4 * r.gateway_cpu / max(r.rate, 1e-9):,.0f} us "
        f"per reading), VmHWM {r.peak_rss / 2**20:.1f} MiB; simulator CPU {r.sim_cpu:.1f} %, mosquitto "
        f"{r.broker_cpu:.1f} %"
    )


# --- 2: one connection, raw pymodbus against the gateway's ModbusSource ----------------------


@dataclass(slots=True)
class Round:
    reads: int
    seconds: float
    client_cpu: float  # this process
    sim_cpu: float

    @property
    def rate(self) -> float:
        return self.reads / self.seconds

    @property
    def client_us(self) -> float:
        return 1e6 * self.client_cpu / max(1, self.reads)

    @property
    def sim_us(self) -> float:
        return 1e6 * self.sim_cpu / max(1, self.reads)


@dataclass(slots=True)
class ConnectionResult:
    raw: list[Round] = field(default_factory=list)
    gateway: list[Round] = field(default_factory=list)
    values_per_reading: float = 0.0
    profiles: dict[str, str] = field(default_factory=dict)
    layers: list[tuple[str, Round | None]] = field(default_factory=list)

    @staticmethod
    def med(rounds: list[Round], attr: str) -> float:
        return median([getattr(r, attr) for r in rounds])

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios: each gateway round against the raw round just before it.

        Pairing neighbours cancels the load of other tenants of this shared machine,
        which drifts over a run by more than the difference being measured.
        """
        return median(g.rate / r.rate for r, g in zip(self.raw, self.gateway, strict=False))


class CountingSink:
    """The gateway's ReadingSink, reduced to counting."""

    def __init__(self) -> None:
        self.readings = 0
        self.values = 0
        self.states: list[str] = []

    async def submit_reading(self, reading: Any) -> None:
        self.readings += 1
        self.values += len(reading.values)

    async def device_state(self, device: str, state: Any, reason: str | None) -> None:
        self.states.append(f"{device}: {state} {reason or ''}".strip())


def _one_device_source(port: int, tags: list[Tag]) -> Any:
    """The gateway's ModbusSource for the one device, polling back to back (call in a running loop)."""
    from gateway.sources.modbus.config import ModbusTcpConfig  # noqa: PLC0415
    from gateway.sources.modbus.source import ModbusSource  # noqa: PLC0415

    config = ModbusTcpConfig.model_validate(
        {
            "kind": "modbus_tcp",
            "name": "one",
            "host": LOOPBACK,
            "port": port,
            "timeout": 1.0,
            "devices": [{"name": "dev", "unit": 1, "poll_interval": FAST_POLL_S, "registers": gateway_registers(tags)}],
        }
    )
    return ModbusSource(config)


async def _timed(step: Any, seconds: float, sim_pid: int) -> Round:
    """``await step()`` back to back for ``seconds`` (after one untimed call)."""
    await step()
    sim0, cpu0, t0 = cpu_of(sim_pid), time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    reads = 0
    while True:
        await step()
        reads += 1
        if time.perf_counter() >= deadline:
            break
    t1, cpu1, sim1 = time.perf_counter(), time.process_time(), cpu_of(sim_pid)
    return Round(reads, t1 - t0, cpu1 - cpu0, sim1 - sim0)


async def _raw_round(client: Any, count: int, seconds: float, sim_pid: int) -> Round:
    reply = await client.read_holding_registers(0, count=count, device_id=1)
    if reply.isError() or len(reply.registers) < count:
        raise BenchError(f"raw pymodbus read failed: {reply}")
    read = client.read_holding_registers
    return await _timed(lambda: read(0, count=count, device_id=1), seconds, sim_pid)


async def _gateway_round(port: int, tags: list[Tag], seconds: float, sim_pid: int, sink: CountingSink) -> Round:
    """The gateway's source running as in the gateway; reads/s from its device's ``responses`` counter."""
    source = _one_device_source(port, tags)
    stats = source.pollers["dev"].stats
    task = asyncio.create_task(source.run(sink), name="bench-source")
    try:
        deadline = time.monotonic() + 10
        while sink.readings < 20:  # connected, and past the first polls
            if task.done() or time.monotonic() > deadline:
                raise BenchError(f"the gateway's source did not read: {sink.states or task}")
            await asyncio.sleep(0.001)
        responses0, readings0 = stats.responses, sink.readings
        sim0, cpu0, t0 = cpu_of(sim_pid), time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        responses1, readings1 = stats.responses, sink.readings
        t1, cpu1, sim1 = time.perf_counter(), time.process_time(), cpu_of(sim_pid)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if stats.timeouts:
        print(f"  ! {stats.timeouts} timeouts in a gateway round")
    if readings1 - readings0 != responses1 - responses0:
        print(f"  ! the sink got {readings1 - readings0} readings for {responses1 - responses0} responses")
    return Round(responses1 - responses0, t1 - t0, cpu1 - cpu0, sim1 - sim0)


async def _layers(port: int, tags: list[Tag], seconds: float, sim_pid: int) -> list[tuple[str, Round | None]]:
    """The gateway's read path one layer at a time, back to back: where its CPU per read goes.

    Uses internals of gateway.sources.modbus (``ModbusBus.read``, ``DevicePoller.request``,
    ``poll``, ``_report``): a layer whose name changed shows as n/a.
    """
    from pymodbus.client import AsyncModbusTcpClient  # noqa: PLC0415

    count = register_span(tags)
    out: list[tuple[str, Round | None]] = []
    raw = AsyncModbusTcpClient(LOOPBACK, port=port, timeout=1.0, retries=0, reconnect_delay=0)
    await raw.connect()
    try:
        out.append(
            (
                "raw pymodbus, the gateway's client settings",
                await _timed(lambda: raw.read_holding_registers(0, count=count, device_id=1), seconds, sim_pid),
            )
        )
    finally:
        raw.close()
    source = _one_device_source(port, tags)
    poller = source.pollers["dev"]
    sink = CountingSink()

    async def poll_and_report() -> None:
        values = await poller.poll(poller.groups, 2)
        await poller._report(values, 0, sink)  # a layer of the poll loop

    steps = [
        ("+ ModbusBus.read (lock, connected check)", lambda: source.bus.read("holding", 1, 0, count, 1.0)),
        (
            "+ DevicePoller.request (counters, latency)",
            lambda: poller.request(source.bus.read, "holding", 1, 0, count, attempts=2),
        ),
        ("+ DevicePoller.poll (decode every tag)", lambda: poller.poll(poller.groups, 2)),
        ("+ report filters, Reading, sink", poll_and_report),
    ]
    try:
        for name, step in steps:
            try:
                out.append((name, await _timed(step, seconds, sim_pid)))
            except (AttributeError, TypeError) as exc:
                print(f"  ({name}: n/a: {exc})")
                out.append((name, None))
    finally:
        source.bus.close()
    out.append(
        ("+ poll loop (ModbusSource.run, 1 us interval)", await _gateway_round(port, tags, seconds, sim_pid, sink))
    )
    return out


async def _connection_rounds(args: argparse.Namespace, port: int, tags: list[Tag], sim_pid: int) -> ConnectionResult:
    from pymodbus.client import AsyncModbusTcpClient  # noqa: PLC0415

    count = register_span(tags)
    result = ConnectionResult()
    client = AsyncModbusTcpClient(LOOPBACK, port=port)
    if not await client.connect():
        raise BenchError(f"raw pymodbus cannot connect to {LOOPBACK}:{port}")
    sink = CountingSink()
    try:

        async def raw() -> Round:
            return await _raw_round(client, count, args.round_seconds, sim_pid)

        async def gw() -> Round:
            readings0, values0 = sink.readings, sink.values
            r = await _gateway_round(port, tags, args.round_seconds, sim_pid, sink)
            result.values_per_reading = (sink.values - values0) / max(1, sink.readings - readings0)
            return r

        for i in range(args.rounds):
            order = ("raw", "gw") if i % 2 == 0 else ("gw", "raw")
            rounds = {name: await (raw() if name == "raw" else gw()) for name in order}
            a, b = rounds["raw"], rounds["gw"]
            result.raw.append(a)
            result.gateway.append(b)
            print(
                f"  round {i + 1}: raw pymodbus {a.rate:,.0f} reads/s ({a.client_us:.0f} us client CPU, "
                f"{a.sim_us:.0f} us sim CPU per read); gateway source {b.rate:,.0f} reads/s "
                f"({b.client_us:.0f} us, {b.sim_us:.0f} us); ratio {b.rate / a.rate:.2f}",
                flush=True,
            )
        if args.profile:
            print("  profiling (not part of the figures above) ...", flush=True)
            result.layers = await _layers(port, tags, args.round_seconds, sim_pid)
            for name, run in (("raw pymodbus", raw), ("gateway ModbusSource", gw)):
                profiler = cProfile.Profile()
                profiler.enable()
                r = await run()
                profiler.disable()
                text = io.StringIO()
                stats = pstats.Stats(profiler, stream=text)
                stats.sort_stats("tottime").print_stats(args.profile_lines)
                stats.sort_stats("cumulative").print_stats(args.profile_lines)
                result.profiles[f"{name} ({r.reads:,} reads under cProfile)"] = text.getvalue()
    finally:
        client.close()
    return result


def run_connection(args: argparse.Namespace, tmp: Path, procs: Processes, tags: list[Tag]) -> ConnectionResult:
    import logging  # noqa: PLC0415

    from fieldlink.runner import run_async  # noqa: PLC0415 (uvloop when available, as in the gateway)

    port = free_port_block(1)
    sim = start_sim(procs, tmp, "one-sim", base_port=port, count=1, tags=tags)
    holder: list[ConnectionResult] = []
    errors: list[BaseException] = []

    async def main() -> None:
        try:
            holder.append(await _connection_rounds(args, port, tags, sim.pid))
        except BenchError as exc:
            errors.append(exc)

    try:
        code = run_async(main(), logging.getLogger("bench.acquisition"))
    finally:
        procs.stop(sim)
    if errors:
        raise errors[0]
    if code == 130:
        raise KeyboardInterrupt
    if not holder:
        raise BenchError(f"the per-connection runs failed (exit {code}; see the log above)")
    return holder[0]


def print_connection(result: ConnectionResult, tags: int, registers: int) -> None:
    raw_rate, gw_rate = result.med(result.raw, "rate"), result.med(result.gateway, "rate")
    print(
        f"  raw pymodbus:   median {raw_rate:,.0f} reads/s (rounds {', '.join(f'{r.rate:,.0f}' for r in result.raw)}); "
        f"client CPU {result.med(result.raw, 'client_us'):.0f} us/read, sim {result.med(result.raw, 'sim_us'):.0f} us"
    )
    print(
        f"  gateway source: median {gw_rate:,.0f} reads/s (rounds "
        f"{', '.join(f'{r.rate:,.0f}' for r in result.gateway)}) = {gw_rate * result.values_per_reading:,.0f} "
        f"values/s; client CPU {result.med(result.gateway, 'client_us'):.0f} us/read, sim "
        f"{result.med(result.gateway, 'sim_us'):.0f} us"
    )
    print(f"  ({tags} tags in one read of {registers} registers per request)")


def print_profiles(result: ConnectionResult) -> None:
    if result.layers:
        print("\n--- the gateway's read path layer by layer (back to back, one connection) ---")
        for name, r in result.layers:
            if r is None:
                print(f"  {name:<48} n/a")
            else:
                print(f"  {name:<48} {r.rate:7,.0f} reads/s  {r.client_us:5.0f} us client CPU per read")
    for name, text in result.profiles.items():
        print(f"\n--- cProfile: {name} ---\n{text.strip()}")


# --- main --------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], allow_abbrev=False)
    parser.add_argument("--duration", type=float, default=60.0, help="fleet: seconds measured")
    parser.add_argument("--devices", type=int, default=200, help="fleet: simulated devices, one TCP server each")
    parser.add_argument("--tags", type=int, default=20, help="tags per device (one read covers them)")
    parser.add_argument("--warm-up", type=float, default=5.0, help="fleet: seconds after every device reports")
    parser.add_argument("--health-interval", type=float, default=5.0, help="fleet: the gateway's health_interval")
    parser.add_argument("--rounds", type=int, default=7, help="per connection: rounds of raw and gateway")
    parser.add_argument("--round-seconds", type=float, default=5.0, help="per connection: seconds of each")
    parser.add_argument("--only", choices=("fleet", "connection"), help="run one part only")
    parser.add_argument(
        "--profile", action="store_true", help="per connection: layer breakdown and one cProfile'd round of each"
    )
    parser.add_argument("--profile-lines", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 devices, 10 s, 2 rounds of 2 s")
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs, and say where")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.duration, args.warm_up, args.health_interval = 10, 10.0, 2.0, 2.0
        args.rounds, args.round_seconds = 2, 2.0
    if args.tags < 1 or args.devices < 1 or args.rounds < 1:
        parser.error("--tags, --devices and --rounds must be at least 1")
    if args.duration < 2 * POLL_INTERVAL_S:
        parser.error(f"--duration must be at least {2 * POLL_INTERVAL_S:g} s")
    tags = make_tags(args.tags)
    if register_span(tags) > 125:
        parser.error(f"{args.tags} tags take {register_span(tags)} registers: more than one read (125)")

    # Ctrl-C and SIGTERM both end in the cleanup below (even if started with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt_on_sigterm()
    one, five, _ = os.getloadavg()
    print(
        f"Modbus acquisition; {os.cpu_count()} cores, load {one:.1f} / {five:.1f}; each device has {len(tags)} tags "
        f"(float32, int16, uint16) in {register_span(tags)} holding registers, one read per poll"
    )
    started = time.monotonic()
    procs = Processes()
    fleet: FleetResult | None = None
    conn: ConnectionResult | None = None
    with temp_dir(args.keep_temp, "acq") as tmp:
        try:
            if args.only in (None, "fleet"):
                print(
                    f"\n1. fleet: {args.devices} simulated Modbus TCP devices (firmware-sim, one process) polled every "
                    f"{POLL_INTERVAL_S:g} s by one gateway process ({args.devices} modbus_tcp sources), uplink to "
                    f"mosquitto; ~{args.duration:g} s between two health reports after a {args.warm_up:g} s warm-up"
                )
                fleet = run_fleet(args, tmp, procs, tags)
                print_fleet(fleet)
            if args.only in (None, "connection"):
                print(
                    f"\n2. one connection to one simulated device, in this process on uvloop, taking turns: raw "
                    f"pymodbus reads back to back vs the gateway's ModbusSource at a {FAST_POLL_S * 1e6:g} us poll "
                    f"interval; {args.rounds} rounds of {args.round_seconds:g} s each"
                )
                conn = run_connection(args, tmp, procs, tags)
                print_connection(conn, len(tags), register_span(tags))
        except BenchError as exc:
            hint = "" if args.keep_temp else " (--keep-temp keeps the logs)"
            print(f"bench-acquisition failed: {exc}{hint}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()

    if conn is not None:
        print_profiles(conn)
    one, five, _ = os.getloadavg()
    print(f"\n=== summary: {time.monotonic() - started:.0f} s; {os.cpu_count()} cores, load {one:.1f} / {five:.1f} ===")
    if fleet is not None:
        ok = fleet.share >= GOAL_RATE_SHARE
        print(
            f"fleet:          {fleet.rate:,.1f} / {fleet.configured_rate:,.0f} readings/s configured "
            f"({100 * fleet.share:.1f} %) [{verdict(ok)}: >= {100 * GOAL_RATE_SHARE:.0f} %], "
            f"{fleet.values / fleet.seconds:,.0f} values/s; gateway CPU {fleet.gateway_cpu:.1f} %, "
            f"VmHWM {fleet.peak_rss / 2**20:.1f} MiB; poll gaps p99 {percentile(fleet.gaps_ms, 99):,.0f} ms"
        )
    if conn is None:
        return 0
    ratio = conn.ratio
    print(
        f"one connection: gateway {conn.med(conn.gateway, 'rate'):,.0f} vs raw pymodbus "
        f"{conn.med(conn.raw, 'rate'):,.0f} reads/s = {ratio:.2f} [{verdict(ratio >= GOAL_RATIO)}: >= "
        f"{GOAL_RATIO:.2f}]; client CPU per read {conn.med(conn.gateway, 'client_us'):.0f} vs "
        f"{conn.med(conn.raw, 'client_us'):.0f} us"
    )
    print(f"acquisition_ratio_vs_raw_pymodbus={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
