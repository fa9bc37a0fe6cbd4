"""Cloud ingest: batch envelopes through mosquitto into ``fieldlink-cloud`` and victoria-metrics, against raw writes.

``make bench-ingest`` runs ``python -m bench.ingest``. Everything is on 127.0.0.1; every
process is started and stopped by this script through its own handle, and the temporary
directory is removed at the end (``--keep-temp`` keeps configs and logs). Servers: Debian
mosquitto with the test rig's settings (persistence, ``max_queued_messages 0``, the rest left at
mosquitto's defaults) and Debian victoria-metrics (``-retentionPeriod=100y``) as the
InfluxDB-v2-write-API store. It measures:

1. **One worker, flat out**, ``--rounds`` times: one ``fieldlink-cloud run`` process (store
   ``kind = "influxdb"`` on victoria-metrics, measurement ``fl_ingest``, dashboard off unless
   ``--dashboard``, no rules, no notifiers). A paho publisher process (QoS 1, ``--window``
   unacknowledged) sends ``--points`` records as batch envelopes (``encode_batch``,
   ``--batch`` records of ``--values`` values each) of ``--gateways`` gateways with
   ``--devices`` devices each on ``fl/<site>/<gw>/batch``, seq growing by one per device.
   It encodes every envelope before the clock starts and then publishes as fast as mosquitto
   acknowledges, so the worker drains a backlog. Figures:

   - points/s stored = points / (first publish -> the first worker health report whose
     ``records_stored`` covers them). Health reports come every ``--health-interval``
     (25 ms), so the end is late by at most that; a point is one record (one line of line
     protocol, one sample per value in victoria-metrics);
   - nothing lost: ``records_stored`` grows by exactly ``--points``, no duplicates dropped,
     no bad messages, store failures or rejected records, and victoria-metrics holds exactly
     ``--points`` samples of ``fl_ingest_temperature`` for the round's site (after
     ``/internal/force_flush``), each device exactly its share;
   - the worker's CPU (% of one core, /proc utime + stime over the round) and peak RSS
     (VmHWM); points per store write (victoria-metrics' own counters:
     ``vm_protoparser_rows_read_total{type="influx"}`` over
     ``vm_http_requests_total{path="/influx/write"}``); mosquitto's and victoria-metrics' CPU.

2. **Raw ceiling**, in the same round right after the worker: influxdb-client in this process,
   ``write_api(write_options=SYNCHRONOUS)``, writing the same kind of records (same fleet,
   another site, measurement ``fl_raw``) formatted beforehand with the cloud's own
   ``format_record`` into batches of the size the worker wrote (from 1.), straight to
   victoria-metrics: points / time spent in ``write()``. Verified the same way in
   victoria-metrics. Per round, ratio = worker points/s over raw points/s; the median is quoted.

3. **p99 ingest latency** at ``--latency-load`` (half) of the worker's median rate, for
   ``--latency-seconds``: the publisher encodes each envelope when it is due (record ``ts`` =
   send time) and notes its publish time; a record's latency is the ``ts`` of the first worker
   health report whose ``records_stored`` covers it minus its publish time. One publisher
   connection and one worker keep the order, so ``records_stored`` covering a record's
   cumulative index means it is stored. The figure is an upper bound, late by at most one
   health interval (25 ms), because the health report is what shows it. Worker CPU at that
   load too.

4. **Two workers** sharing the subscription, if the cloud config knows
   ``[broker] shared_group`` (:data:`SHARED_KEY`): the single worker is stopped (its broker
   session cleared), two workers with ``shared_group`` set run flat out on ``--points`` and
   their combined points/s (first publish -> the sum of both ``records_stored`` covering
   them) is printed, with each worker's share. Without the key it prints that two workers
   are not available.

The last line of stdout is ``ingest_ratio_vs_raw_influx=<x>`` (goal: at least 0.5).
The publisher is a subcommand of this file (``_pub``), run as its own process; it answers
on stdout (``ready``, then one JSON line) and starts when it reads ``go`` on stdin.

Measurements (shared 2-core VM, load 0.8-1.6 from other work; ``make bench-ingest``, the
defaults above; medians of three rounds per run):

- before (the worker decoding every value into Value/Record objects, writing through
  influxdb-client in a thread): 13-18k points/s, ratio 0.10-0.13, the worker at 90 % of
  a core.
- after, four runs: one worker 69,500-81,700 points/s (median of each run) against a raw
  ceiling of 109,000-119,000, ratio 0.68, 0.60, 0.53 and 0.62 (rounds 0.51-0.75); the
  worker at 62-81 % of a core, victoria-metrics at 51-65 % (105-113 % in the raw phase);
  4,800 points per store write; VmHWM 190 MiB, most of it the 200,000-point backlog
  mosquitto pushes in at once. p99 latency 106-177 ms at 23,600-29,100 points/s (half
  load); two workers 78,000-100,000 points/s combined (the two cores are full).
- load-independent, per point, decode + dedup + format + HTTP write without the broker
  (``IngestPipeline.handle`` on these envelopes against victoria-metrics, under
  ``valgrind --tool=callgrind``, the difference of a 2,000- and a 12,000-point run):
  261,000 instructions before, 60,000 after. Per point with timeit (GC on): decode 11.7 us
  -> scan 2.3 us; format 8.0 us -> template 2.0-2.4 us; dedup 1.2 -> 0.5 us. ``msgpack.unpackb``
  of such an envelope costs 46,000 instructions (3.5 us) a point: it was never the cap.

Where the time went, and what changed (cloud/ingest.py and fieldlink/wire.py say more):
building a Value per value and a Record per record, and formatting from them (now
``BatchScanner`` reads records of known shapes from the bytes and ``LineFormatter``
formats them with one ``%`` template per shape); influxdb-client's write in a thread,
which waited for the GIL at every step while the loop decoded (a 5,000-line write took
75 ms instead of 15; now an HTTP/1.1 write on the event loop); decode, write and ack one
after the other (now the next round is decoded while the store writes); CPython's
default GC threshold, which walked every record of a round several times (a fifth of the
worker's CPU); and paho reading one packet per event-loop turn (now up to 64).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    LOOPBACK,
    BenchError,
    Mosquitto,
    ProcStats,
    interrupt_on_sigterm,
    log_tail,
    median,
    mqtt_subscriber,
    paho_connect,
    percentile,
    read_line,
    spawn,
    stop_process,
    temp_dir,
    wait_until,
)

GOAL_RATIO = 0.5
SHARED_KEY = "shared_group"  # [broker] key that puts the workers in one MQTT shared subscription
SHARED_GROUP = "bench-ingest"
MEASUREMENT = "fl_ingest"  # the workers' points
RAW_MEASUREMENT = "fl_raw"  # the raw ceiling's points
CHECK_FIELD = "temperature"  # the field counted in victoria-metrics (every record has it)
TOKEN, ORG, BUCKET = "bench-token", "bench", "fieldlink"
READY = "ready"
BIN = Path(sys.executable).parent
REPOSITORY = Path(__file__).resolve().parent.parent

# (field, type, unit): what a pump skid, boiler or compressor reports, in wire types.
METRICS: tuple[tuple[str, str, str | None], ...] = (
    ("temperature", "float", "degC"),
    ("pressure", "float", "bar"),
    ("flow", "float", "m3/h"),
    ("power", "float", "kW"),
    ("energy", "int", "Wh"),
    ("vibration", "float", "mm/s"),
    ("humidity", "float", "%"),
    ("speed", "int", "rpm"),
    ("current", "float", "A"),
    ("running", "bool", None),
)
DEVICE_KINDS = ("boiler", "pump", "compressor", "chiller", "meter", "fan", "valve", "tank")


# --- the fleet: records and envelopes (publisher and raw ceiling alike) ---------------------


class Fleet:
    """``gateways`` gateways of ``devices`` devices; records in turn, seq +1 per device, ``ts`` >= now.

    Message ``i`` is a batch of gateway ``i % gateways``, its records taken from that gateway's
    devices in turn. A device's ``ts`` grows by at least 1 ms per record, so no two samples of
    one series share a timestamp and victoria-metrics' sample count equals the records stored.
    """

    def __init__(self, site: str, gateways: int, devices: int, values: int) -> None:
        from fieldlink.wire import Quality, Value, ValueType  # noqa: PLC0415 (the controller may not need it)

        self.site = site
        self.gateways = [f"gw-{g + 1:02d}" for g in range(gateways)]
        kinds = DEVICE_KINDS
        self.devices = [f"{kinds[d % len(kinds)]}-{d // len(kinds) + 1:02d}" for d in range(devices)]
        self.topics = [f"fl/{site}/{gw}/batch" for gw in self.gateways]
        metrics = list(METRICS[:values]) + [(f"aux_{k}", "float", None) for k in range(values - len(METRICS))]
        self._metrics = [(name, ValueType(kind), unit) for name, kind, unit in metrics]
        self._value, self._good = Value, Quality.GOOD
        self._cursor = [0] * gateways
        self._seq = [[0] * devices for _ in range(gateways)]
        self._last_ts = [[0] * devices for _ in range(gateways)]
        self._messages = 0

    def _values(self, d: int, seq: int) -> dict[str, Any]:
        out = {}
        wave = (seq * 7 + d * 13) % 1000
        for k, (name, kind, unit) in enumerate(self._metrics):
            if kind.value == "float":
                v: Any = 20.0 + k * 10 + wave / 10
            elif kind.value == "int":
                v = seq * 10 + k if name == "energy" else 1000 + wave
            else:
                v = wave % 10 != 0
            out[name] = self._value(v, unit, self._good, kind)
        return out

    def next_batch(self, size: int, now_ms: int) -> tuple[int, list[Any]]:
        """(gateway index, records) of the next message."""
        from fieldlink.wire import Record  # noqa: PLC0415

        g = self._messages % len(self.gateways)
        self._messages += 1
        seqs, last_ts = self._seq[g], self._last_ts[g]
        records = []
        for _ in range(size):
            d = self._cursor[g]
            self._cursor[g] = (d + 1) % len(self.devices)
            seqs[d] += 1
            ts = last_ts[d] = max(now_ms, last_ts[d] + 1)
            records.append(Record(self.site, self.gateways[g], self.devices[d], seqs[d], ts, self._values(d, seqs[d])))
        return g, records

    def expected_per_series(self, points: int, batch: int) -> dict[tuple[str, str], int]:
        """(gateway, device): how many records ``points`` in batches of ``batch`` give each (from a fresh fleet)."""
        counts: dict[tuple[str, str], int] = {}
        cursor = [0] * len(self.gateways)
        for i, size in enumerate(batch_sizes(points, batch)):
            g = i % len(self.gateways)
            for _ in range(size):
                key = (self.gateways[g], self.devices[cursor[g]])
                counts[key] = counts.get(key, 0) + 1
                cursor[g] = (cursor[g] + 1) % len(self.devices)
        return counts


def batch_sizes(points: int, batch: int) -> list[int]:
    full, rest = divmod(points, batch)
    return [batch] * full + ([rest] if rest else [])


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the publisher (its own process) ---------------------------------------------------------


def run_publisher(args: argparse.Namespace) -> int:
    """Publish ``points`` records in batch envelopes at QoS 1, flat out (pre-encoded) or paced.

    Prints ``ready``, waits for ``go`` on stdin, publishes, waits for every PUBACK and prints
    one JSON line: counts, wall-clock start and end, and per message (publish time in ms,
    records published up to and including it).
    """
    from fieldlink.wire import encode_batch  # noqa: PLC0415

    fleet = Fleet(args.site, args.gateways, args.devices, args.values)
    sizes = batch_sizes(args.points, args.batch)
    paced = args.rate > 0

    def encode(size: int) -> tuple[str, bytes]:
        g, records = fleet.next_batch(size, now_ms())
        return fleet.topics[g], encode_batch(fleet.site, fleet.gateways[g], records)

    deadline = time.monotonic() + args.deadline
    client = paho_connect(f"bench-ingest-pub-{os.getpid()}", args.port, deadline, args.window)
    prepared = [] if paced else [encode(size) for size in sizes]
    acked = 0

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1

    client.on_publish = on_publish
    print(READY, flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    deadline = time.monotonic() + args.deadline
    timeline: list[tuple[float, int]] = []
    sent = cumulative = payload_bytes = 0
    worst_lag = 0.0
    start_wall, start = time.time(), time.monotonic()
    while acked < len(sizes) and time.monotonic() < deadline:
        now = time.monotonic()
        while sent < len(sizes) and sent - acked < args.window:
            due = start + cumulative / args.rate if paced else now
            if due > now:
                break
            worst_lag = max(worst_lag, now - due)
            topic_name, payload = encode(sizes[sent]) if paced else prepared[sent]
            client.publish(topic_name, payload, qos=1)
            cumulative += sizes[sent]
            payload_bytes += len(payload)
            timeline.append((time.time() * 1000, cumulative))
            sent += 1
            now = time.monotonic()
        if not paced or sent >= len(sizes) or sent - acked >= args.window:
            timeout = 0.05  # woken by the next PUBACK
        else:
            timeout = max(0.0, min(0.05, start + cumulative / args.rate - time.monotonic()))
        client.loop(timeout=timeout)
    end_wall = time.time()
    client.disconnect()
    result = {
        "messages": len(sizes),
        "sent": sent,
        "acked": acked,
        "points": cumulative,
        "payload_bytes": payload_bytes,
        "start_wall": start_wall,
        "end_wall": end_wall,
        "worst_lag_ms": round(worst_lag * 1000, 1),
        "timeline": timeline,
    }
    print(json.dumps(result), flush=True)
    return 0


# --- the controller: servers, workers, health reports ------------------------------------------


class HealthWatch:
    """QoS 0 subscriber on ``fl-cloud/+/health``: every worker's reports, by worker name, as they come."""

    def __init__(self, port: int) -> None:

        self.reports: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.client = mqtt_subscriber(port, "fl-cloud/+/health", f"bench-ingest-watch-{os.getpid()}", self._on_message)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _client: object, _userdata: object, message: Any) -> None:
        if message.retain:
            return  # a previous worker's last word
        body = json.loads(message.payload)
        with self._lock:
            self.reports.setdefault(body["cloud"], []).append(body)

    def of(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.reports.get(name, ()))

    def latest(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            reports = self.reports.get(name)
            return reports[-1] if reports else None

    def fresh(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first report that arrives from now on."""
        seen = len(self.of(name))
        wait_until(f"a health report from {name}", lambda: len(self.of(name)) > seen, timeout)
        return self.of(name)[seen]

    def stored_at(self, names: Sequence[str], target: int, after_ms: float = 0.0) -> float | None:
        """``ts`` of the first moment the workers' ``records_stored`` summed reach ``target`` (None: not yet)."""
        events = sorted(
            (report["ts"], name, report["records_stored"])
            for name in names
            for report in self.of(name)
            if report["ts"] >= after_ms
        )
        latest = {name: 0 for name in names}
        for name in names:
            earlier = [r["records_stored"] for r in self.of(name) if r["ts"] < after_ms]
            latest[name] = earlier[-1] if earlier else 0
        for ts, name, stored in events:
            latest[name] = stored
            if sum(latest.values()) >= target:
                return float(ts)
        return None


@dataclass(slots=True)
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def client_id(self) -> str:
        return f"fieldlink-cloud-{self.name}"


VM_METRICS_CACHE_S = 1.2  # victoria-metrics answers /metrics from a cache refreshed about once a second


def vm_counters(url: str) -> tuple[int, int]:
    """(influx write requests, influx lines read) from victoria-metrics' /metrics, once its cache caught up."""
    time.sleep(VM_METRICS_CACHE_S)
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:  # noqa: S310 (our own http URL)
        text = response.read().decode()
    requests = lines = 0
    for line in text.splitlines():
        if line.startswith("vm_http_requests_total{") and 'path="/influx/write"' in line:
            requests += int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith('vm_protoparser_rows_read_total{type="influx"}'):
            lines += int(float(line.rsplit(" ", 1)[1]))
    return requests, lines


def shared_subscriptions_supported() -> bool:
    from cloud.config import BrokerSection  # noqa: PLC0415

    return SHARED_KEY in BrokerSection.model_fields


@dataclass(slots=True)
class Phase:
    """One flat-out or paced run of workers, or a raw run: what it took and what it cost."""

    label: str
    points: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # process: % of one core
    peak_rss: int = 0  # VmHWM: the largest since the process started
    rss: int = 0  # VmRSS at the end of the phase
    points_per_write: float = 0.0
    shares: dict[str, int] = field(default_factory=dict)  # worker: records stored in this phase
    latencies_ms: list[float] = field(default_factory=list)
    publisher: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.points / self.seconds if self.seconds > 0 else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        from tests.rig.victoria import VictoriaMetrics  # noqa: PLC0415

        self.args = args
        self.tmp = tmp
        self.mosquitto = Mosquitto(tmp / "mosquitto")
        self.vm = VictoriaMetrics(tmp / "victoria-metrics", retention="100y")
        self.watch: HealthWatch | None = None
        self.workers: list[Worker] = []
        self.publishers: list[subprocess.Popen[bytes]] = []
        self._phases = 0

    # --- servers and processes ----------------------------------------------------------

    def start_servers(self) -> None:
        self.mosquitto.start()
        self.vm.start()
        self.watch = HealthWatch(self.mosquitto.port)

    def stop_all(self) -> None:
        for proc in self.publishers:
            with contextlib.suppress(Exception):
                stop_process(proc, timeout=5)
        for worker in reversed(self.workers):
            with contextlib.suppress(Exception):
                stop_process(worker.proc, timeout=15)
        self.workers.clear()
        if self.watch is not None:
            with contextlib.suppress(Exception):
                self.watch.stop()
        for server in (self.vm, self.mosquitto):
            with contextlib.suppress(Exception):
                server.stop()

    def worker_config(self, name: str, shared_group: str | None) -> Path:
        args = self.args
        shared = f'{SHARED_KEY} = "{shared_group}"\n' if shared_group else ""
        text = f"""
[cloud]
name = "{name}"
state_dir = "{self.tmp / name}"
health_interval = {args.health_interval}

[broker]
url = "mqtt://{LOOPBACK}:{self.mosquitto.port}"
{shared}
[store]
kind = "influxdb"
url = "{self.vm.url}"
org = "{ORG}"
bucket = "{BUCKET}"
token = "{TOKEN}"
measurement = "{MEASUREMENT}"
timeout = "30s"

[dashboard]
enabled = {"true" if args.dashboard else "false"}

[logging]
level = "warning"
"""
        path = self.tmp / f"{name}.toml"
        path.write_text(text)
        check = subprocess.run(
            [str(BIN / "fieldlink-cloud"), "check-config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check.returncode != 0:
            raise BenchError(f"fieldlink-cloud check-config {path}:\n{check.stdout}{check.stderr}")
        return path

    def start_worker(self, name: str, shared_group: str | None = None) -> Worker:
        config = self.worker_config(name, shared_group)
        log_path = self.tmp / f"{name}.log"
        proc = spawn([str(BIN / "fieldlink-cloud"), "run", "--config", str(config)], log_path)
        worker = Worker(name, proc, log_path)
        self.workers.append(worker)
        assert self.watch is not None
        watch = self.watch

        def connected() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"worker {name} exited with {proc.returncode}:\n{log_tail(log_path)}")
            latest = watch.latest(name)
            return latest is not None and latest["broker"] == "connected"

        # The health loop publishes only on an open, subscribed connection.
        wait_until(f"worker {name} connected and subscribed", connected, 60)
        return worker

    def stop_worker(self, worker: Worker) -> None:
        """Stop it and end its persistent session, so mosquitto queues nothing more for it."""
        stop_process(worker.proc, timeout=15)
        self.workers.remove(worker)
        client = paho_connect(worker.client_id, self.mosquitto.port, time.monotonic() + 10)
        client.disconnect()
        client.loop(timeout=0.1)

    def check_alive(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is not None:
                code, tail = worker.proc.returncode, log_tail(worker.log_path)
                raise BenchError(f"worker {worker.name} exited with {code}:\n{tail}")

    # --- publisher ------------------------------------------------------------------------

    def publish(
        self, site: str, points: int, rate: float, names: Sequence[str], pids: dict[str, int]
    ) -> tuple[dict[str, Any], float, dict[str, float]]:
        """Run one publisher to the end: its answer, ``ts`` when the workers had stored it all, and CPU %.

        The CPU of ``pids`` is read just before the publisher is told to go and as soon as the
        workers' health shows everything stored (within 50 ms): % of one core over that window.
        """
        args = self.args
        assert self.watch is not None
        baseline = {name: (self.watch.fresh(name)["records_stored"]) for name in names}
        target = sum(baseline.values()) + points
        argv = [sys.executable, "-m", "bench.ingest", "_pub", "--port", str(self.mosquitto.port), "--site", site]
        argv += ["--points", str(points), "--batch", str(args.batch), "--values", str(args.values)]
        argv += ["--gateways", str(args.gateways), "--devices", str(args.devices), "--window", str(args.window)]
        argv += ["--rate", str(rate), "--deadline", str(args.deadline)]
        with (self.tmp / f"pub-{site}.log").open("ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPOSITORY)
        self.publishers.append(proc)
        try:
            if read_line(proc, 120, "publisher") != READY:
                raise BenchError("publisher: unexpected answer")
            assert proc.stdin is not None
            before = {name: ProcStats.read(pid) for name, pid in pids.items()}
            t_before = time.monotonic()
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            answer = json.loads(read_line(proc, args.deadline + 30, "publisher", self.check_alive))
        finally:
            stop_process(proc, timeout=5)
            self.publishers.remove(proc)
        if answer["acked"] != answer["messages"]:
            raise BenchError(f"publisher: {answer['acked']} of {answer['messages']} messages acknowledged")
        deadline = time.monotonic() + args.deadline
        while (done := self.watch.stored_at(names, target, answer["start_wall"] * 1000 - 1000)) is None:
            self.check_alive()
            if time.monotonic() > deadline:
                stored = sum(self.watch.of(n)[-1]["records_stored"] for n in names) - sum(baseline.values())
                raise BenchError(f"workers stored {stored} of {points} records within {args.deadline:.0f} s")
            time.sleep(0.05)
        after = {name: ProcStats.read(pid) for name, pid in pids.items()}
        wall = time.monotonic() - t_before
        self.check_totals(names, baseline, points)
        return answer, done, {name: 100 * (after[name].cpu - before[name].cpu) / wall for name in pids}

    def check_totals(self, names: Sequence[str], baseline: dict[str, int], points: int) -> None:
        """Exactly ``points`` more stored, and nothing dropped, refused or failed along the way."""
        assert self.watch is not None
        totals: dict[str, int] = {}
        for name in names:
            report = self.watch.fresh(name)
            for key in ("records_stored", "duplicates_dropped", "bad_messages", "store_failures", "records_rejected"):
                totals[key] = totals.get(key, 0) + report[key]
        stored = totals["records_stored"] - sum(baseline.values())
        if stored != points:
            raise BenchError(f"workers stored {stored} records, {points} were published")
        problems = {k: v for k, v in totals.items() if k != "records_stored" and v}
        if problems:
            raise BenchError(f"worker counters not zero: {problems}")

    def verify_store(self, measurement: str, site: str, points: int) -> None:
        """victoria-metrics holds exactly one sample per record, per device as published."""
        match = f'{{__name__="{measurement}_{CHECK_FIELD}",site="{site}"}}'
        series = self.vm.wait_for_samples(match, points, timeout=60)
        expected = Fleet(site, self.args.gateways, self.args.devices, self.args.values).expected_per_series(
            points, self.args.batch
        )
        got = {(s["metric"]["gateway"], s["metric"]["device"]): len(s["values"]) for s in series}
        if got != expected:
            wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))[:5]
            details = ", ".join(f"{g}/{d}: {got.get((g, d), 0)} of {expected.get((g, d), 0)}" for g, d in wrong)
            raise BenchError(f"victoria-metrics {match}: {sum(got.values())} samples of {points}; e.g. {details}")

    # --- the phases -------------------------------------------------------------------------

    def _site(self, tag: str) -> str:
        self._phases += 1
        return f"plant-{tag}-{self._phases}"

    def run_workers(self, label: str, workers: Sequence[Worker], points: int, rate: float = 0.0) -> Phase:
        """Publish ``points`` (flat out, or paced at ``rate`` points/s) and measure the workers."""
        site = self._site("w" if rate <= 0 else "lat")
        names = [w.name for w in workers]
        pids = {w.name: w.proc.pid for w in workers}
        pids |= {"mosquitto": self.mosquitto.pid, "victoria-metrics": vm_pid(self.vm)}
        vm_before = vm_counters(self.vm.url)
        answer, done_ms, cpu = self.publish(site, points, rate, names, pids)
        vm_after = vm_counters(self.vm.url)
        self.verify_store(MEASUREMENT, site, points)
        assert self.watch is not None
        phase = Phase(label, points, (done_ms - answer["start_wall"] * 1000) / 1000, cpu)
        stats = [ProcStats.read(w.proc.pid) for w in workers]
        phase.peak_rss, phase.rss = max(st.peak_rss for st in stats), max(st.rss for st in stats)
        writes = vm_after[0] - vm_before[0]
        phase.points_per_write = (vm_after[1] - vm_before[1]) / writes if writes else 0.0
        start_ms = answer["start_wall"] * 1000 - 1000
        for name in names:
            reports = [r for r in self.watch.of(name) if r["ts"] >= start_ms]
            earlier = [r for r in self.watch.of(name) if r["ts"] < start_ms]
            first = earlier[-1]["records_stored"] if earlier else 0
            phase.shares[name] = reports[-1]["records_stored"] - first if reports else 0
        if len(names) == 1:
            phase.latencies_ms = latencies(answer["timeline"], self.watch.of(names[0]), start_ms)
        phase.publisher = {k: v for k, v in answer.items() if k != "timeline"}
        return phase

    def run_raw(self, points: int, per_write: int) -> Phase:
        """influxdb-client, synchronous, pre-formatted line protocol in batches of ``per_write``."""
        from influxdb_client import InfluxDBClient, WritePrecision  # noqa: PLC0415
        from influxdb_client.client.write_api import SYNCHRONOUS  # noqa: PLC0415

        from cloud.stores.line_protocol import format_record  # noqa: PLC0415

        args = self.args
        site = self._site("raw")
        fleet = Fleet(site, args.gateways, args.devices, args.values)
        lines: list[str] = []
        for size in batch_sizes(points, args.batch):  # the same records the publisher would send
            _, records = fleet.next_batch(size, now_ms())
            lines += [line for r in records if (line := format_record(r, RAW_MEASUREMENT)) is not None]
        chunks = [lines[i : i + per_write] for i in range(0, len(lines), per_write)]
        pids = {"victoria-metrics": vm_pid(self.vm), "bench (raw client)": os.getpid()}
        with InfluxDBClient(url=self.vm.url, token=TOKEN, org=ORG, timeout=30_000) as client:
            write_api = client.write_api(write_options=SYNCHRONOUS)
            warm = f"{RAW_MEASUREMENT}_warm,site={site} x=1i {now_ms()}"
            write_api.write(bucket=BUCKET, org=ORG, record=[warm], write_precision=WritePrecision.MS)
            vm_before = vm_counters(self.vm.url)
            before = {name: ProcStats.read(pid) for name, pid in pids.items()}
            start = time.perf_counter()
            for chunk in chunks:
                write_api.write(bucket=BUCKET, org=ORG, record=chunk, write_precision=WritePrecision.MS)
            seconds = time.perf_counter() - start
            after = {name: ProcStats.read(pid) for name, pid in pids.items()}
            vm_after = vm_counters(self.vm.url)
        self.verify_store(RAW_MEASUREMENT, site, points)
        phase = Phase("raw influxdb-client", points, seconds)
        phase.cpu = {name: 100 * (after[name].cpu - before[name].cpu) / seconds for name in pids}
        writes = vm_after[0] - vm_before[0]
        phase.points_per_write = (vm_after[1] - vm_before[1]) / writes if writes else 0.0
        return phase


def vm_pid(vm: Any) -> int:
    proc = vm._proc  # the rig's handle has no public pid
    if proc is None:
        raise BenchError("victoria-metrics is not running")
    return int(proc.pid)


def latencies(timeline: list[list[float]], reports: list[dict[str, Any]], after_ms: float) -> list[float]:
    """Per message: the ``ts`` of the first health report covering its records minus its publish time (ms)."""
    earlier = [r["records_stored"] for r in reports if r["ts"] < after_ms]
    base = earlier[-1] if earlier else 0
    points = [(r["ts"], r["records_stored"] - base) for r in reports if r["ts"] >= after_ms]
    out: list[float] = []
    i = 0
    for published_ms, cumulative in timeline:
        while i < len(points) and points[i][1] < cumulative:
            i += 1
        if i == len(points):
            break
        out.append(max(0.0, points[i][0] - published_ms))
    return out


# --- reporting ----------------------------------------------------------------------------------


def mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def cpu_text(phase: Phase) -> str:
    return ", ".join(f"{name} {value:.0f} %" for name, value in phase.cpu.items())


def print_worker_phase(phase: Phase) -> None:
    pub = phase.publisher
    p99 = percentile(phase.latencies_ms, 99)
    print(
        f"  {phase.label}: {phase.rate:,.0f} points/s ({phase.points:,} in {phase.seconds:.2f} s), "
        f"{phase.points_per_write:,.0f} points per store write; CPU: {cpu_text(phase)}; worker VmHWM "
        f"{mib(phase.peak_rss)}; publish -> stored p99 {p99:,.0f} ms (backlog: everything published in "
        f"{pub['end_wall'] - pub['start_wall']:.2f} s)"
    )


def print_raw_phase(phase: Phase) -> None:
    print(
        f"  {phase.label}: {phase.rate:,.0f} points/s ({phase.points:,} in {phase.seconds:.2f} s), "
        f"{phase.points_per_write:,.0f} points per write; CPU: {cpu_text(phase)}"
    )


def run(args: argparse.Namespace, bench: Bench) -> float:
    """Every phase; returns the ratio quoted on the last line."""
    bench.start_servers()
    worker = bench.start_worker("cloud-1")
    print(
        f"\n1+2. one worker flat out vs raw influxdb-client writes, {args.rounds} round(s) of "
        f"{args.points:,} points each (a point: one record of {args.values} values)"
    )
    # A warm-up: the worker's first store write opens its connection, the first series are created.
    bench.run_workers("warm-up", [worker], min(args.points, 10 * args.batch))
    worker_phases: list[Phase] = []
    raw_phases: list[Phase] = []
    ratios: list[float] = []
    for i in range(args.rounds):
        phase = bench.run_workers(f"round {i + 1} worker", [worker], args.points)
        print_worker_phase(phase)
        per_write = round(phase.points_per_write) or args.batch
        raw = bench.run_raw(args.points, per_write)
        print_raw_phase(raw)
        ratio = phase.rate / raw.rate
        print(f"  round {i + 1} ratio: {ratio:.2f}")
        worker_phases.append(phase)
        raw_phases.append(raw)
        ratios.append(ratio)
    worker_rate = median([p.rate for p in worker_phases])

    target = args.latency_load * worker_rate
    points = max(args.batch, round(target * args.latency_seconds / args.batch) * args.batch)
    print(
        f"\n3. latency at {100 * args.latency_load:.0f} % of the worker's median rate: {target:,.0f} points/s paced "
        f"for ~{args.latency_seconds:g} s ({points:,} points); publish -> health report showing it stored "
        f"(an upper bound, late by at most {1000 * args.health_interval:.0f} ms)"
    )
    paced = bench.run_workers("paced", [worker], points, rate=target)
    lat = paced.latencies_ms
    print(
        f"  paced: {paced.rate:,.0f} points/s stored; latency p50 {percentile(lat, 50):,.0f} ms, p99 "
        f"{percentile(lat, 99):,.0f} ms, max {max(lat, default=float('nan')):,.0f} ms ({len(lat)} messages); CPU: "
        f"{cpu_text(paced)}; worker VmRSS {mib(paced.rss)} (VmHWM {mib(paced.peak_rss)}); publisher worst lag "
        f"{paced.publisher['worst_lag_ms']} ms"
    )
    two: Phase | None = None
    print("\n4. two workers sharing the subscription")
    if not shared_subscriptions_supported():
        print("  two workers: not available (no shared subscriptions yet)")
    else:
        bench.stop_worker(worker)
        pair = [bench.start_worker(name, SHARED_GROUP) for name in ("cloud-a", "cloud-b")]
        bench.run_workers("two workers warm-up", pair, min(args.points, 10 * args.batch))
        two = bench.run_workers("two workers", pair, args.points)
        shares = ", ".join(f"{name} {count:,}" for name, count in two.shares.items())
        print(
            f"  two workers: {two.rate:,.0f} points/s combined ({two.points:,} in {two.seconds:.2f} s; {shares}); "
            f"CPU: {cpu_text(two)}; VmHWM {mib(two.peak_rss)} (larger of the two)"
        )

    ratio = median(ratios)
    raw_rate = median([p.rate for p in raw_phases])
    one, five, _ = os.getloadavg()
    print(f"\n=== summary; {os.cpu_count()} cores, load {one:.1f} / {five:.1f} ===")
    print(
        f"one worker:   {worker_rate:,.0f} points/s ({worker_rate * args.values:,.0f} values/s), CPU "
        f"{median([p.cpu[worker.name] for p in worker_phases]):.0f} % of a core, VmHWM {mib(paced.peak_rss)} "
        f"(VmRSS {mib(paced.rss)} after the paced run), "
        f"{median([p.points_per_write for p in worker_phases]):,.0f} points per store write"
    )
    print(f"raw ceiling:  {raw_rate:,.0f} points/s (influxdb-client SYNCHRONOUS, pre-formatted line protocol)")
    print(f"latency:      p99 {percentile(lat, 99):,.0f} ms at {paced.rate:,.0f} points/s (upper bound)")
    if two is not None:
        print(f"two workers:  {two.rate:,.0f} points/s combined = {two.rate / worker_rate:.2f} x one worker")
    else:
        print("two workers:  not available (no shared subscriptions yet)")
    verdict = "ok" if ratio >= GOAL_RATIO else "MISSED"
    print(f"ratio:        {ratio:.2f} (median of {len(ratios)} round(s)) [{verdict}: >= {GOAL_RATIO}]")
    return ratio


def controller(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt_on_sigterm()
    one, five, _ = os.getloadavg()
    print(
        f"Cloud ingest; {os.cpu_count()} cores, load {one:.1f} / {five:.1f}; {args.gateways} gateways x "
        f"{args.devices} devices, batch envelopes of {args.batch} records x {args.values} values, QoS 1, "
        f"publisher window {args.window}; worker health every {1000 * args.health_interval:.0f} ms, dashboard "
        f"{'on' if args.dashboard else 'off'}"
    )
    with temp_dir(args.keep_temp, "ingest") as tmp:
        bench = Bench(args, tmp)
        try:
            ratio = run(args, bench)
        except BenchError as exc:
            hint = "" if args.keep_temp else " (--keep-temp keeps the logs)"
            print(f"bench-ingest failed: {exc}{hint}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            bench.stop_all()
    print(f"ingest_ratio_vs_raw_influx={ratio:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command")
    pub = commands.add_parser("_pub", help=argparse.SUPPRESS)
    pub.add_argument("--port", type=int, required=True)
    pub.add_argument("--site", required=True)
    pub.add_argument("--points", type=int, required=True)
    pub.add_argument("--batch", type=int, required=True)
    pub.add_argument("--values", type=int, required=True)
    pub.add_argument("--gateways", type=int, required=True)
    pub.add_argument("--devices", type=int, required=True)
    pub.add_argument("--window", type=int, required=True)
    pub.add_argument("--rate", type=float, default=0.0, help="points/s; 0: flat out")
    pub.add_argument("--deadline", type=float, default=600.0)

    parser.add_argument("--points", type=int, default=200_000, help="records per flat-out run (default 200,000)")
    parser.add_argument("--batch", type=int, default=100, help="records per batch envelope (default 100)")
    parser.add_argument("--values", type=int, default=10, help="values per record (default 10)")
    parser.add_argument("--gateways", type=int, default=4)
    parser.add_argument("--devices", type=int, default=50, help="devices per gateway")
    parser.add_argument("--window", type=int, default=50, help="publisher: unacknowledged QoS 1 messages")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of worker and raw (ratio: their median)")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--latency-load", type=float, default=0.5, help="share of the worker's rate, paced")
    parser.add_argument("--health-interval", type=float, default=0.025, help="the workers' health_interval (s)")
    parser.add_argument("--dashboard", action="store_true", help="leave the workers' dashboard republishing on")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds any one run may take")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20,000 points, one round, 3 s paced")
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs, and say where")
    args = parser.parse_args(argv)
    if args.command == "_pub":
        return run_publisher(args)
    if args.quick:
        args.points, args.rounds, args.latency_seconds = 20_000, 1, 3.0
    if min(args.points, args.batch, args.values, args.gateways, args.devices, args.window, args.rounds) < 1:
        parser.error("--points, --batch, --values, --gateways, --devices, --window and --rounds must be at least 1")
    if not 0 < args.latency_load <= 1:
        parser.error("--latency-load must be in (0, 1]")
    return controller(args)


if __name__ == "__main__":
    sys.exit(main())
