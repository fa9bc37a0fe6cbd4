"""Replay of a buffered backlog: the gateway against a Mosquitto-to-Mosquitto bridge.

``make bench-replay`` runs ``python -m bench.replay``; ``--records 50000`` for a quick run.
Everything is on 127.0.0.1, every process is started and stopped by this script through
its own handle (also on Ctrl-C, SIGTERM and errors), every wait has a deadline (a drain
without a new record for ``--stall-timeout`` seconds fails), and the temporary directory is
removed at the end (``--keep`` keeps it, with every log and config).

**Gateway side.** N readings (``--records``, default 1,000,000) of ``--devices`` simulated
Modbus meters, four values each (temperature, pressure, flow as floats; an energy counter
as an int; all with units), go into a gateway buffer file through the gateway's own
``StoreAndForwardBuffer`` API, ``--chunk`` concurrent ``add_reading`` calls at a time so
that group commit applies (the fill rate is reported). That is the backlog the gateway
kept while the cloud broker was unreachable. Then a cloud Mosquitto is started (persistence
on, ``autosave_interval 1``, ``max_queued_messages 0``, as in the test rig), a subscriber
subscribes to ``fl/#``, and ``fieldlink-gateway run`` starts on that buffer with its uplink
pointed at the cloud broker (local broker off, no sources). The drain time runs from the
gateway's start until the subscriber has counted all N distinct ``(device, seq)``, whether
they arrive as record or batch envelopes. The gateway's peak RSS (VmHWM) and CPU seconds
are read just before it is stopped with SIGTERM (it must exit 0).

**Bridge side.** Mosquitto A (local, the same settings, plus a bridge ``connection`` to B:
``topic fl/# out 1``, ``cleansession false``) gets the same N messages at QoS 1 while
Mosquitto B (remote, configured like the cloud broker) is down, so that A queues them for
the bridge: the same topics and byte-identical payloads, encoded with
``fieldlink.wire.encode_record``. Then B starts, and the time runs until the subscriber on
B has counted all N records. A must have logged refused bridge connections while B was
down (its RSS growth by the backlog is reported too). The bridge's window is A's
``max_inflight_messages``: Mosquitto's default, 20, is slower than 100 (measured: 20, 100,
1000 and 0 = unlimited, at 200k records); 100 is also what ``deploy/mosquitto`` sets, so
it is the default here. ``--bridge-inflight 20,100,0`` runs each and compares the fastest.
A retries the bridge every 1-2 s (``restart_timeout 1 1``; the default backs off up to 30 s,
which would measure the retry timer), so the bridge time includes up to 2 s of waiting for
that retry, as the gateway's includes its start-up; both are also reported from the first
record on. ``--autosave-interval`` changes every broker's (default 1 s, as in the rig and
``deploy/mosquitto``; Mosquitto's own default is 1800 s). Mosquitto rewrites its whole
persistence file at each autosave, so with a large backlog A spends most of its time on
that: the bridge's rate depends strongly on both N and this setting.

**Subscriber.** The same raw MQTT 3.1.1 subscriber (``bench/_common.py``) on both sides,
in its own process, with a QoS 0 subscription (no acknowledgements; a paho subscriber
would top out near 10k messages/s and be what is measured). It counts records by distinct
``(device, seq)`` from the envelopes and checks a sample with ``fieldlink.wire.decode``.
Its session is persistent and both remote brokers queue QoS 0 for it (``queue_qos0_messages
true``), so nothing is lost if the bridge connects before the subscriber does.

The report gives medians over ``--repeat`` runs and, per process and drain, CPU seconds,
how often its main thread and its other threads were running or waiting for a CPU, how
often it waited for the disk, and its peak RSS: which process limits the drain. Then the
total wall time, and as the last line of stdout ``replay_ratio_vs_mosquitto_bridge=<x>``:
gateway records/s over bridge records/s, each from its start. The goal is at least 3.
``--only gateway|bridge`` runs one side, without a ratio. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench._common import (
    LOOPBACK,
    BenchError,
    Counts,
    Mosquitto,
    ProcStats,
    StateSampler,
    Subscriber,
    fmt_int,
    fmt_mb,
    load_average,
    log_tail,
    median,
    publish_qos1,
    spawn,
    stop_process,
)
from fieldlink.wire import Record, TopicKind, Value, encode_record, topic
from gateway.buffer import StoreAndForwardBuffer
from gateway.sources.base import Reading

SITE = "bench"
GATEWAY = "gw-replay"
TOPIC_FILTER = "fl/#"
SUBSCRIBER_ID = "bench-replay-sub"
TS_START_MS = 1_764_000_000_000
POLL_PERIOD_MS = 1000
VALUE_SETS = 4096  # distinct value sets, cycled: generating 1M fresh ones would take longer than the drain
BRIDGE_NAME = "bench-bridge"
GOAL = 3.0
DEFAULT_BRIDGE_INFLIGHT = 100
PROGRESS_EVERY = 10.0
# Both remote brokers (the gateway's cloud broker and bridge B) get exactly this on top of the rig settings.
REMOTE_BROKER_EXTRA = ("queue_qos0_messages true",)


# --- the workload --------------------------------------------------------------------------


def value_sets(seed: int) -> list[dict[str, Value]]:
    """What one Modbus poll of a meter yields: three floats and a counter, each with a unit."""
    rng = random.Random(seed)
    return [
        {
            "temperature": Value.of(round(rng.uniform(55.0, 95.0), 2), "degC"),
            "pressure": Value.of(round(rng.uniform(1.0, 6.0), 3), "bar"),
            "flow": Value.of(round(rng.uniform(0.0, 120.0), 2), "m3/h"),
            "energy": Value.of(rng.randint(100_000, 9_999_999), "kWh"),
        }
        for _ in range(VALUE_SETS)
    ]


def device_names(devices: int) -> list[str]:
    return [f"meter-{i:03d}" for i in range(devices)]


def readings(records: int, devices: int, seed: int) -> Iterator[Reading]:
    """Round robin over the devices, one poll per device per second."""
    names, values = device_names(devices), value_sets(seed)
    for i in range(records):
        yield Reading(names[i % devices], TS_START_MS + (i // devices) * POLL_PERIOD_MS, values[i % VALUE_SETS])


def record_messages(records: int, devices: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """The same readings as the telemetry messages a fresh gateway buffer holds: seq from 1 per device."""
    seqs: dict[str, int] = {}
    topics = {name: topic(TopicKind.TELEMETRY, SITE, GATEWAY, name) for name in device_names(devices)}
    for reading in readings(records, devices, seed):
        seq = seqs[reading.device] = seqs.get(reading.device, 0) + 1
        record = Record(SITE, GATEWAY, reading.device, seq, reading.ts, reading.values)
        yield topics[reading.device], encode_record(record)


def payload_sizes(devices: int, seed: int, sample: int = 10_000) -> tuple[float, int, int]:
    sizes = [len(payload) for _, payload in record_messages(sample, devices, seed)]
    return sum(sizes) / len(sizes), min(sizes), max(sizes)


# --- measuring a drain ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drain:
    records: int
    seconds: float  # start (gateway or B) to the last new record at the subscriber
    first_after: float  # start to the first record
    duplicates: int
    messages: int

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def steady_rate(self) -> float:
        """Records/s from the first record to the last: without the start-up."""
        return self.records / max(self.seconds - self.first_after, 1e-9)


def wait_for_records(
    what: str,
    subscriber: Subscriber,
    expected: int,
    started_at: float,
    *,
    alive: Callable[[], None],
    stall_timeout: float,
) -> Drain:
    """Wait until the subscriber has ``expected`` distinct records; BenchError on a stall."""
    best, progress_at, reported_at = -1, time.monotonic(), time.monotonic()
    while True:
        subscriber.check()
        alive()
        counts: Counts = subscriber.counts()
        now = time.monotonic()
        if counts.items >= expected:
            return Drain(
                counts.items,
                counts.last_at - started_at,
                counts.first_at - started_at,
                counts.duplicates,
                counts.messages,
            )
        if counts.items > best:
            best, progress_at = counts.items, now
        elif now - progress_at > stall_timeout:
            raise BenchError(
                f"{what}: stalled, no new record for {stall_timeout:.0f} s at {fmt_int(counts.items)} of "
                f"{fmt_int(expected)} ({fmt_int(counts.duplicates)} duplicates, {fmt_int(counts.messages)} messages)"
            )
        if now - reported_at >= PROGRESS_EVERY:
            reported_at = now
            rate = counts.items / (now - started_at)
            progress(f"  {what}: {fmt_int(counts.items)} of {fmt_int(expected)} records, {fmt_int(rate)}/s so far")
        time.sleep(0.05)


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- what each process did -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """One process during one drain."""

    cpu: float  # CPU seconds during the drain (the gateway: since its start, which is the drain's start)
    peak_rss: int  # VmHWM just before the process was stopped
    running: float  # share of the drain with its main thread running or runnable
    others_running: float  # share of the drain with another of its threads running or runnable
    disk_wait: float  # share of the drain with a thread waiting for the disk


def usages(before: dict[str, ProcStats], after: dict[str, ProcStats], sampler: StateSampler) -> dict[str, Usage]:
    return {
        name: Usage(
            cpu=after[name].cpu - (before[name].cpu if name in before else 0.0),
            peak_rss=after[name].peak_rss,
            running=sampler.running(name),
            others_running=sampler.others_running(name),
            disk_wait=sampler.disk_wait(name),
        )
        for name in after
    }


def snapshot(pids: dict[str, int]) -> dict[str, ProcStats]:
    return {name: ProcStats.read(pid) for name, pid in pids.items()}


@dataclass(frozen=True, slots=True)
class SideRun:
    """One run of one side: its fill, its drain, and what each of its processes did."""

    fill_seconds: float
    drain: Drain
    usage: dict[str, Usage]
    notes: tuple[str, ...] = ()


# --- gateway side --------------------------------------------------------------------------


async def fill_buffer(path: Path, records: int, devices: int, seed: int, chunk: int) -> None:
    """Buffer the readings through the gateway's API, ``chunk`` concurrent calls at a time, two chunks queued."""
    buffer = StoreAndForwardBuffer(path, site=SITE, gateway=GATEWAY)
    await buffer.open()
    try:
        stream = readings(records, devices, seed)
        previous: asyncio.Future[object] | None = None
        while batch := [reading for _, reading in zip(range(chunk), stream, strict=False)]:
            current = asyncio.gather(*(buffer.add_reading(reading) for reading in batch))
            if previous is not None:
                await previous
            previous = current
        if previous is not None:
            await previous
    finally:
        await buffer.close()


def gateway_toml(state_dir: Path, broker_port: int, max_inflight: int | None) -> str:
    inflight = "" if max_inflight is None else f"max_inflight = {max_inflight}\n"
    return f"""\
[gateway]
site = "{SITE}"
id = "{GATEWAY}"
state_dir = "{state_dir}"
drain_timeout = "5s"

[local_broker]
enabled = false

[buffer]
path = "buffer.db"

[uplink]
url = "mqtt://{LOOPBACK}:{broker_port}"
{inflight}
[logging]
level = "info"
"""


def gateway_binary() -> str:
    beside = Path(sys.executable).with_name("fieldlink-gateway")
    found = str(beside) if beside.exists() else shutil.which("fieldlink-gateway")
    if found is None:
        raise BenchError("fieldlink-gateway not found: run `make install` (pip install -e .)")
    return found


def run_gateway_side(args: argparse.Namespace, workdir: Path) -> SideRun:
    state_dir = workdir / "gateway"
    state_dir.mkdir(parents=True)
    progress(f"gateway: buffering {fmt_int(args.records)} records ...")
    started = time.monotonic()
    asyncio.run(fill_buffer(state_dir / "buffer.db", args.records, args.devices, args.seed, args.chunk))
    fill_seconds = time.monotonic() - started
    buffer_bytes = sum(f.stat().st_size for f in state_dir.glob("buffer.db*"))
    progress(f"gateway: buffered in {fill_seconds:.1f} s ({fmt_int(args.records / fill_seconds)} records/s)")

    with contextlib.ExitStack() as stack:
        cloud = Mosquitto(workdir / "cloud", autosave_interval=args.autosave_interval, extra=REMOTE_BROKER_EXTRA)
        cloud.start()
        stack.callback(cloud.stop)
        subscriber = Subscriber(LOOPBACK, cloud.port, TOPIC_FILTER, client_id=SUBSCRIBER_ID, clean_session=False)
        subscriber.start()
        stack.callback(subscriber.stop)
        config = state_dir / "gateway.toml"
        config.write_text(gateway_toml(state_dir, cloud.port, args.gateway_max_inflight))
        log_path = state_dir / "gateway.log"
        before = snapshot({"cloud mosquitto": cloud.pid, "subscriber": subscriber.pid})

        progress("gateway: starting fieldlink-gateway, draining ...")
        started_at = time.monotonic()
        proc = spawn([gateway_binary(), "run", "--config", str(config)], log_path)
        stack.callback(stop_process, proc, 30.0)

        def alive() -> None:
            if proc.poll() is not None:
                raise BenchError(f"fieldlink-gateway exited with {proc.returncode}; log:\n{log_tail(log_path)}")

        pids = {"gateway": proc.pid, "cloud mosquitto": cloud.pid, "subscriber": subscriber.pid}
        with StateSampler(pids) as sampler:
            drain = wait_for_records(
                "gateway drain", subscriber, args.records, started_at, alive=alive, stall_timeout=args.stall_timeout
            )
        after = snapshot(pids)
        exit_code = stop_process(proc, 30.0)
    gateway = after["gateway"]
    others = sorted((cpu for tid, (_, cpu) in gateway.threads.items() if tid != gateway.pid), reverse=True)
    notes = [
        f"buffer file {fmt_mb(buffer_bytes)}; gateway CPU by thread: main {gateway.main_thread_cpu:.1f} s, "
        f"others {', '.join(f'{cpu:.1f} s' for cpu in others[:3]) or 'none'}"
    ]
    if exit_code != 0:
        notes.append(f"gateway exited with {exit_code} on SIGTERM (expected 0); log:\n{log_tail(log_path, 10)}")
    return SideRun(fill_seconds, drain, usages(before, after, sampler), tuple(notes))


# --- bridge side ---------------------------------------------------------------------------


def bridge_conf(b_port: int, inflight: int) -> list[str]:
    return [
        f"max_inflight_messages {inflight}",
        f"connection {BRIDGE_NAME}",
        f"address {LOOPBACK}:{b_port}",
        "topic fl/# out 1",
        "cleansession false",
        # Retry every 1-2 s while B is down. A single value is documented as a constant delay,
        # but mosquitto 2.0.11 then still backs off (7 s, 11 s, ... measured); "base cap" works.
        "restart_timeout 1 1",
    ]


def run_bridge_side(args: argparse.Namespace, workdir: Path, inflight: int) -> SideRun:
    root = workdir / f"bridge-{inflight}"
    b = Mosquitto(root / "b", autosave_interval=args.autosave_interval, extra=REMOTE_BROKER_EXTRA)
    a = Mosquitto(root / "a", autosave_interval=args.autosave_interval, extra=bridge_conf(b.port, inflight))
    with contextlib.ExitStack() as stack:
        # B once, to create the subscriber's persistent session (subscription included); stopping
        # B saves it, and the restarted B queues for the subscriber until it has reconnected.
        b.start()
        stack.callback(b.stop)
        first = Subscriber(LOOPBACK, b.port, TOPIC_FILTER, client_id=SUBSCRIBER_ID, clean_session=False)
        first.start()
        first.stop()
        b.stop()

        a.start()
        stack.callback(a.stop)
        rss_empty = ProcStats.read(a.pid).rss
        progress(f"bridge (max_inflight_messages {inflight}): publishing {fmt_int(args.records)} to A, B down ...")
        started = time.monotonic()
        acknowledged = publish_qos1(LOOPBACK, a.port, record_messages(args.records, args.devices, args.seed))
        fill_seconds = time.monotonic() - started
        if acknowledged != args.records:
            raise BenchError(f"A acknowledged {acknowledged} of {args.records} messages")
        rss_full = ProcStats.read(a.pid).rss
        refused = count_refused_bridge_connects(a.log_path)
        if refused == 0:
            raise BenchError(f"A's log shows no failed bridge connection while B was down:\n{log_tail(a.log_path)}")
        progress(
            f"bridge: A holds the backlog after {fill_seconds:.1f} s ({fmt_int(args.records / fill_seconds)} msg/s), "
            f"RSS {fmt_mb(rss_full)}; {refused} bridge connects refused while B is down"
        )

        subscriber = Subscriber(LOOPBACK, b.port, TOPIC_FILTER, client_id=SUBSCRIBER_ID, clean_session=False)
        subscriber.start(wait=False)  # imports done, retrying until B listens
        stack.callback(subscriber.stop)
        before = snapshot({"mosquitto A": a.pid, "subscriber": subscriber.pid})
        progress("bridge: starting B, draining ...")
        started_at = time.monotonic()
        b.start()
        subscriber.wait_subscribed()

        def alive() -> None:
            for name, broker in (("A", a), ("B", b)):
                if not broker.running:
                    raise BenchError(f"mosquitto {name} exited; log:\n{log_tail(broker.log_path)}")

        pids = {"mosquitto A": a.pid, "mosquitto B": b.pid, "subscriber": subscriber.pid}
        with StateSampler(pids) as sampler:
            drain = wait_for_records(
                "bridge drain", subscriber, args.records, started_at, alive=alive, stall_timeout=args.stall_timeout
            )
        after = snapshot(pids)
        warnings = [line for line in a.log_path.read_text(errors="replace").splitlines() if "dropped" in line.lower()]
    notes = [
        f"A's RSS {fmt_mb(rss_empty)} empty, {fmt_mb(rss_full)} with the backlog; "
        f"{refused} refused bridge connects in A's log while B was down"
    ]
    if warnings:
        notes.append(f"A's log: {warnings[0]}")
    return SideRun(fill_seconds, drain, usages(before, after, sampler), tuple(notes))


def count_refused_bridge_connects(log_path: Path) -> int:
    """Lines in which A reports a failed bridge connection (B down)."""
    return sum("Error creating bridge" in line for line in log_path.read_text(errors="replace").splitlines())


# --- report --------------------------------------------------------------------------------


def report_side(title: str, runs: Sequence[SideRun], records: int, fill_what: str) -> None:
    drains = [r.drain for r in runs]
    seconds = median([d.seconds for d in drains])
    fill_seconds = median([r.fill_seconds for r in runs])
    print(title)
    print(f"  fill: {fmt_int(records / fill_seconds)}/s, {fill_seconds:.1f} s: {fill_what}")
    first_after = median([d.first_after for d in drains])
    steady = median([d.steady_rate for d in drains])
    print(
        f"  drain: {fmt_int(median([d.rate for d in drains]))} records/s, {seconds:.1f} s; "
        f"first record after {first_after:.2f} s, from then on {fmt_int(steady)}/s"
    )
    print(
        f"  delivered: {fmt_int(drains[-1].records)} distinct records in {fmt_int(drains[-1].messages)} messages, "
        f"{fmt_int(drains[-1].duplicates)} duplicates"
    )
    print(f"  {'process':<16} {'CPU s':>6} {'% core':>7} {'main R':>7} {'other R':>8} {'disk D':>7} {'peak RSS':>10}")
    for name in runs[-1].usage:
        usage = [r.usage[name] for r in runs]
        cpu = median([u.cpu for u in usage])
        print(
            f"  {name:<16} {cpu:>6.1f} {100 * cpu / seconds:>6.0f}% {share([u.running for u in usage]):>7} "
            f"{share([u.others_running for u in usage]):>8} {share([u.disk_wait for u in usage]):>7} "
            f"{fmt_mb(median([u.peak_rss for u in usage])):>10}"
        )
    for note in runs[-1].notes:
        print(f"  {note}")


def share(values: Sequence[float]) -> str:
    return f"{100 * median(values):.0f}%"


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=1_000_000, help="backlog size (default 1,000,000)")
    parser.add_argument("--devices", type=int, default=8, help="simulated meters (default 8)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side; medians are reported (default 1)")
    parser.add_argument("--chunk", type=int, default=2000, help="concurrent add_reading calls while filling")
    parser.add_argument(
        "--bridge-inflight",
        default=str(DEFAULT_BRIDGE_INFLIGHT),
        help="A's max_inflight_messages, the bridge's window: a number or a comma list, of which the fastest is "
        f"compared (default {DEFAULT_BRIDGE_INFLIGHT}; Mosquitto's default is 20, 0 means no limit)",
    )
    parser.add_argument(
        "--gateway-max-inflight", type=int, default=None, help="uplink.max_inflight (default: the gateway's default)"
    )
    parser.add_argument(
        "--autosave-interval",
        type=int,
        default=1,
        help="every broker's autosave_interval in seconds (default 1, as in the rig and deploy/mosquitto)",
    )
    parser.add_argument("--stall-timeout", type=float, default=60.0, help="fail after this long without progress")
    parser.add_argument(
        "--only",
        choices=["gateway", "bridge"],
        default=None,
        help="run one side only, to investigate it (no ratio line then)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)
    if args.records < 1 or args.devices < 1 or args.repeat < 1 or args.chunk < 1:
        parser.error("--records, --devices, --repeat and --chunk must be at least 1")
    try:
        args.inflights = [int(v) for v in args.bridge_inflight.split(",")]
    except ValueError:
        parser.error(f"--bridge-inflight: numbers separated by commas, got {args.bridge_inflight!r}")
    return args


def mosquitto_version() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5, check=False).stdout
        return out.splitlines()[0] if out else "mosquitto"
    return "mosquitto (not found)"


def interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (timeout, CI) unwinds like Ctrl-C, so that every ExitStack stops its processes.
    signal.signal(signal.SIGTERM, interrupt)
    wall_start = time.monotonic()
    load_before = load_average()
    workdir = Path(tempfile.mkdtemp(prefix="fieldlink-bench-replay-", dir=args.workdir))
    gateway_runs: list[SideRun] = []
    bridge_runs: dict[int, list[SideRun]] = {inflight: [] for inflight in args.inflights}
    try:
        for run in range(args.repeat):
            progress(f"run {run + 1} of {args.repeat}, in {workdir}")
            if args.only != "bridge":
                gateway_runs.append(run_gateway_side(args, workdir / f"run-{run}"))
            if args.only != "gateway":
                for inflight in args.inflights:
                    bridge_runs[inflight].append(run_bridge_side(args, workdir / f"run-{run}", inflight))
            if not args.keep:
                shutil.rmtree(workdir / f"run-{run}", ignore_errors=True)
    except BenchError as exc:
        print(f"replay benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("replay benchmark interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(args, gateway_runs, bridge_runs, time.monotonic() - wall_start, load_before)
    return 0


def report(
    args: argparse.Namespace,
    gateway_runs: Sequence[SideRun],
    bridge_runs: dict[int, list[SideRun]],
    wall: float,
    load_before: tuple[float, float, float],
) -> None:
    mean_size, min_size, max_size = payload_sizes(args.devices, args.seed)
    runs_text = f"{args.repeat} run{'s' if args.repeat > 1 else ''}"
    print(
        f"replay of a {fmt_int(args.records)}-record backlog, {args.devices} devices, record payload "
        f"{mean_size:.0f} B (msgpack, {min_size}-{max_size}); medians of {runs_text}"
    )
    print(
        f"machine: {os.cpu_count()} cores, load average {load_before[0]:.2f} before, "
        f"{load_average()[0]:.2f} after; {mosquitto_version()}; brokers' autosave_interval {args.autosave_interval}"
    )
    print(
        "(% core: CPU time over drain time; main R / other R: share of samples with the main thread / another "
        "thread running or waiting for a CPU; disk D: a thread waiting for the disk)"
    )
    if gateway_runs:
        inflight = "default" if args.gateway_max_inflight is None else str(args.gateway_max_inflight)
        report_side(
            f"gateway: fieldlink-gateway run (uplink max_inflight {inflight}) replays its buffer to a cloud Mosquitto",
            gateway_runs,
            args.records,
            f"{args.chunk} concurrent StoreAndForwardBuffer.add_reading calls at a time",
        )
    rates = {i: median([r.drain.rate for r in runs]) for i, runs in bridge_runs.items() if runs}
    best = max(rates, key=lambda i: rates[i]) if rates else None
    for inflight_messages, runs in bridge_runs.items():
        if not runs:
            continue
        default = " (Mosquitto's default)" if inflight_messages == 20 else ""
        fastest = ", the fastest: compared" if len(bridge_runs) > 1 and inflight_messages == best else ""
        report_side(
            f"bridge: Mosquitto A -> B, max_inflight_messages {inflight_messages}{default}{fastest}",
            runs,
            args.records,
            "publishing to A at QoS 1 while B is down",
        )
    print(f"total wall time: {wall:.0f} s")
    if best is None or not gateway_runs:
        print(f"(--only {args.only}: no ratio)")
        return
    gateway_rate = median([r.drain.rate for r in gateway_runs])
    steady = median([r.drain.steady_rate for r in gateway_runs]) / median(
        [r.drain.steady_rate for r in bridge_runs[best]]
    )
    print(
        f"gateway {fmt_int(gateway_rate)} records/s vs bridge {fmt_int(rates[best])} records/s "
        f"(max_inflight_messages {best}); from the first record on: ratio {steady:.2f}; goal: ratio >= {GOAL:g}"
    )
    print(f"replay_ratio_vs_mosquitto_bridge={gateway_rate / rates[best]:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
