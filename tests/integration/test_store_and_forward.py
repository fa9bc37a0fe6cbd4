"""Store-and-forward under faults: whatever the gateway buffered reaches the cloud broker.

Every test runs the same small site, every part a real process or server:

    firmware-sim (4 Modbus devices, polled every 50-100 ms)
      -> fieldlink-gateway (SQLite buffer, embedded amqtt)
      -> FaultProxy (tests/rig/proxy.py) -> Debian mosquitto (persistence on, unlimited queues)
      -> a persistent-session MqttProbe on the data topics, subscribed before the gateway starts

and breaks one thing: the gateway (kill -9), the broker (stop/start), the link (stall,
cut, refuse), or the config (SIGHUP). Each test ends with a clean stop of the gateway
and then asserts that every (device, seq) the gateway's buffer handed out reached the
probe. Duplicates are legal (at-least-once); they are counted, printed, and bounded by
what can be unacknowledged when a fault strikes: the uplink's window of `max_inflight`
messages of up to `batch_max_records` records, once more for acknowledgements whose
delete was not committed yet, per fault.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.publish as mqtt_publish
import pytest

from fieldlink.snapshot import LAST_HEALTH_FILE
from fieldlink.wire import Encoding, Record, Topic, TopicKind, Value, WireError, decode, encode_batch
from tests.integration.fleet import (
    CLOUD_DATA_TOPICS,
    FAULT_DEVICES,
    GATEWAY,
    SITE,
    counter_sim_toml,
    counter_source,
    duplicates,
    gateway_toml,
    produced,
    wait_local_health,
    with_keys,
)
from tests.rig import LOOPBACK, Mosquitto, MqttProbe, free_port
from tests.rig.programs import Program, Programs
from tests.rig.proxy import FaultProxy

pytestmark = pytest.mark.timeout(150)

SEED = 20240607
MAX_INFLIGHT = 20
BATCH_MAX_RECORDS = 50
ACK_TIMEOUT = 2.0
# What a fault can make the gateway send twice (see the module docstring).
DUPLICATES_PER_FAULT = 2 * MAX_INFLIGHT * BATCH_MAX_RECORDS
UPLINK_KEYS = f"""
ack_timeout = "{ACK_TIMEOUT:g}s"
connect_timeout = "3s"
max_inflight = {MAX_INFLIGHT}
batch_max_records = {BATCH_MAX_RECORDS}
"""
POLL = 0.05  # how often the tests look at what arrived


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; TimeoutError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(POLL)


class Tally:
    """The records a probe received, decoded once each as they come in."""

    def __init__(self, probe: MqttProbe) -> None:
        self.probe = probe
        self.counts: Counter[tuple[str, int]] = Counter()
        self.first: dict[tuple[str, int], tuple[float, Record]] = {}  # first arrival (time.time()) and record
        self._decoded = 0

    def update(self) -> Tally:
        fresh = self.probe.timed_messages[self._decoded :]
        self._decoded += len(fresh)
        for arrival, message in fresh:
            try:
                kind = Topic.parse(message.topic).kind
            except WireError:
                continue
            if kind not in (TopicKind.TELEMETRY, TopicKind.BATCH):
                continue
            for record in decode(message.payload):
                key = (record.device, record.seq)
                self.counts[key] += 1
                self.first.setdefault(key, (arrival, record))
        return self

    def distinct(self, device: str | None = None) -> int:
        self.update()
        return sum(1 for d, _ in self.counts if device is None or d == device)

    def wait_more(self, records: int, timeout: float = 30.0) -> None:
        """Wait until `records` more distinct records than now arrived: traffic flows."""
        target = self.distinct() + records
        wait_until(lambda: self.distinct() >= target, timeout, f"{target} distinct records at the probe")

    def wait_all(self, expected: set[tuple[str, int]], timeout: float = 30.0) -> None:
        def complete() -> bool:
            self.update()
            return expected <= self.counts.keys()

        try:
            wait_until(complete, timeout, "every produced record at the probe")
        except TimeoutError:
            missing = sorted(expected - self.counts.keys())
            raise AssertionError(f"{len(missing)} of {len(expected)} records never arrived: {missing[:20]}") from None


@dataclass
class Site:
    """One test's fleet: simulator, gateway, FaultProxy in front of mosquitto, cloud-side probe."""

    programs: Programs
    mosquitto: Mosquitto
    workdir: Path
    proxy: FaultProxy
    probe: MqttProbe
    tally: Tally
    modbus_port: int
    local_port: int
    gateway: Program | None = None
    faults: list[str] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.workdir / "gateway"

    def config(
        self,
        uplink_url: str | None = None,
        poll: str = "50ms",
        uplink_keys: str = UPLINK_KEYS,
        devices: tuple[str, ...] = FAULT_DEVICES,
    ) -> str:
        """The gateway's config: by default through the proxy, all four devices every 50 ms."""
        source = counter_source("pumps", self.modbus_port, poll, devices)
        text = gateway_toml(self.state, self.local_port, uplink_url or self.proxy.url, source)
        return with_keys(text, "uplink", uplink_keys)

    def start_gateway(self, config_text: str | None = None) -> Program:
        if self.gateway is None:
            self.gateway = self.programs.gateway(config_text or self.config())
        self.gateway.start().wait_port(self.local_port)
        return self.gateway

    def fault(self, description: str) -> None:
        self.faults.append(description)
        print(f"fault {len(self.faults)}: {description}")

    def stop_and_check(self, timeout: float = 30.0) -> dict:
        """Stop the gateway cleanly, then assert that every record it produced arrived; returns its last health."""
        assert self.gateway is not None
        assert self.gateway.stop() == 0, self.gateway.log()[-3000:]
        expected = produced(self.state)
        self.tally.wait_all(expected, timeout)
        counts = Counter({key: n for key, n in self.tally.counts.items() if key in expected})
        doubled = duplicates(counts)
        extra = sum(n - 1 for n in doubled.values())
        print(
            f"produced={len(expected)} received={len(counts)} lost=0 duplicates={extra} "
            f"faults={len(self.faults)} (duplicated records: {list(doubled.items())[:30]})"
        )
        assert self.tally.counts.keys() <= expected, "the probe saw records the buffer never handed out"
        assert extra <= max(1, len(self.faults)) * DUPLICATES_PER_FAULT, f"{extra} duplicates"
        assert self.probe.sessions_lost == 0, "the probe's persistent session was lost: it may have missed records"
        return json.loads((self.state / LAST_HEALTH_FILE).read_text())


@pytest.fixture
def site(programs: Programs, mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Site]:
    """A running simulator, a passing proxy and a connected probe; the test starts the gateway."""
    with ExitStack() as stack:
        modbus_port = free_port()
        programs.simulator(counter_sim_toml(modbus_port)).start().wait_port(modbus_port)
        proxy = FaultProxy(mosquitto.host, mosquitto.port)
        proxy.start()
        stack.callback(proxy.stop)
        # A persistent session, as the cloud has: it outlives a broker restart.
        probe = MqttProbe(mosquitto.host, mosquitto.port, CLOUD_DATA_TOPICS, clean_session=False, client_id="probe")
        stack.enter_context(probe)
        yield Site(programs, mosquitto, tmp_path, proxy, probe, Tally(probe), modbus_port, free_port())


def test_kill_9_of_the_gateway_mid_stream_loses_nothing(site: Site) -> None:
    """Four kill -9 at random points of the stream (seeded), each followed by a restart."""
    rng = random.Random(SEED)
    gateway = site.start_gateway()
    for _ in range(4):
        site.tally.wait_more(rng.randint(1, 150))
        site.fault(f"kill -9 after {site.tally.distinct()} records")
        assert gateway.kill() == -9
        site.start_gateway()
    site.tally.wait_more(40)
    site.stop_and_check()


def test_cloud_broker_stop_and_start_during_traffic_loses_nothing(site: Site) -> None:
    """Mosquitto goes away twice while the devices produce; the gateway buffers and replays."""
    site.start_gateway()
    for _ in range(2):
        site.tally.wait_more(40)
        before = wait_local_health(site.local_port, lambda h: True)["records_buffered"]
        site.fault("cloud broker stopped")
        assert site.mosquitto.stop() == 0
        # The gateway notices and buffers what the devices produce meanwhile.
        wait_local_health(
            site.local_port,
            lambda h, before=before: (
                h["uplink"]["state"] != "connected"
                and h["records_buffered"] >= before + 40
                and h["buffer"]["records"] >= 40
            ),
        )
        site.mosquitto.start()
        site.tally.wait_more(80)
    health = site.stop_and_check()
    assert health["uplink"]["connects"] >= 3
    assert site.probe.connects >= 3, "the probe came back after each restart"


def test_a_silently_stalled_link_is_dropped_after_ack_timeout_and_replayed(site: Site) -> None:
    """The link black-holes (no FIN, no RST): the missing PUBACK drops it after ack_timeout (2 s).

    The stall lasts on after that, through a reconnect that hangs in it too (given up
    after connect_timeout, 3 s), before the link passes again.
    """
    site.start_gateway()
    site.tally.wait_more(40)
    connections = site.proxy.accepted
    site.fault("link stalled")
    site.proxy.stall()
    stalled_at = time.monotonic()
    dead = wait_local_health(site.local_port, lambda h: h["uplink"]["dead_links"] >= 1, timeout=30)
    assert dead["uplink"]["state"] != "connected"
    assert f"no PUBACK within {ACK_TIMEOUT:g}s; link presumed dead" in site.gateway.log()
    # The reconnect hangs in the stall, is given up, and the gateway tries once more.
    site.proxy.wait_connections(connections + 2, timeout=30)
    stalled_for = time.monotonic() - stalled_at
    site.proxy.pass_()
    site.tally.wait_more(80)
    health = site.stop_and_check()
    assert stalled_for > 2 * ACK_TIMEOUT
    assert health["uplink"]["dead_links"] >= 1
    assert health["uplink"]["connects"] >= 2


def test_a_link_cut_again_and_again_loses_nothing(site: Site) -> None:
    """Six connection resets (RST both ways), each once the link carried traffic again."""
    site.start_gateway()
    cuts = 6
    for i in range(cuts):
        site.proxy.wait_connections(i + 1, timeout=15)
        site.tally.wait_more(20)
        site.fault("link cut")
        site.proxy.cut()
    site.proxy.wait_connections(cuts + 1, timeout=15)
    site.tally.wait_more(40)
    health = site.stop_and_check()
    assert health["uplink"]["connects"] >= cuts + 1
    assert site.proxy.accepted >= cuts + 1


BULK_DEVICE = "bulk-1"
BULK_RECORDS = 6000
BULK_PER_MESSAGE = 500
BYTES_PER_S = 40_000
LIVE_LATENCY_S = 2.0
LIVE_MARGIN_S = 2.0  # readings polled this soon after the reconnect may still count as backlog


def _bulk_messages(n: int) -> list[tuple[str, bytes, int, bool]]:
    topic = f"fl/{SITE}/{GATEWAY}/dev/{BULK_DEVICE}/telemetry"
    now = time.time_ns() // 1_000_000
    records = [
        Record(SITE, GATEWAY, BULK_DEVICE, i + 1, now - n + i, {"level": Value.of(float(i), "mm")}) for i in range(n)
    ]
    chunks = [records[i : i + BULK_PER_MESSAGE] for i in range(0, n, BULK_PER_MESSAGE)]
    return [(topic, encode_batch(SITE, GATEWAY, chunk, Encoding.MSGPACK), 1, False) for chunk in chunks]


def test_live_readings_overtake_a_draining_backlog(site: Site) -> None:
    """Replay fairness: fresh readings are not stuck behind a backlog.

    A backlog of 6000 records (from a local publisher, while the broker refuses
    connections) drains at max_bytes_per_s = 40 kB/s, which takes several seconds.
    Meanwhile every Modbus reading polled after the reconnect (4 devices every
    100 ms) reaches the cloud-side probe within 2 s of its timestamp, while the
    backlog is still replaying.
    """
    site.proxy.refuse()
    rate_capped = UPLINK_KEYS.replace(f"batch_max_records = {BATCH_MAX_RECORDS}", "batch_max_records = 100")
    site.start_gateway(site.config(poll="100ms", uplink_keys=rate_capped + f"max_bytes_per_s = {BYTES_PER_S}\n"))
    mqtt_publish.multiple(_bulk_messages(BULK_RECORDS), hostname=LOOPBACK, port=site.local_port)
    wait_local_health(site.local_port, lambda h: h["last_seq"].get(BULK_DEVICE, 0) >= BULK_RECORDS, timeout=60)

    site.fault("link refused while the backlog built up; now passes")
    site.proxy.pass_()
    site.proxy.wait_connections(1, timeout=15)
    connected_at = time.time()
    replaying = wait_local_health(site.local_port, lambda h: h["uplink"]["connects"] >= 1 and h["uplink"]["replaying"])
    wait_until(lambda: site.tally.distinct(BULK_DEVICE) >= BULK_RECORDS, 90, "the backlog at the probe")
    drained_at = max(at for (device, _), (at, _r) in site.tally.first.items() if device == BULK_DEVICE)
    health = site.stop_and_check(timeout=60)

    live = [
        (at - record.ts / 1000, record)
        for (device, _), (at, record) in site.tally.first.items()
        if device in FAULT_DEVICES and record.ts / 1000 > connected_at + LIVE_MARGIN_S and at < drained_at
    ]
    worst = max(live, key=lambda x: x[0], default=(0.0, None))
    print(
        f"backlog drained in {drained_at - connected_at:.1f} s; {len(live)} live readings meanwhile, "
        f"worst latency {worst[0]:.2f} s ({worst[1]}); replay_lag_s at start {replaying['uplink']['replay_lag_s']}; "
        f"lanes {health['uplink']['lanes']}"
    )
    assert drained_at - connected_at >= LIVE_MARGIN_S + 2, "the backlog drained too fast to show anything"
    assert len(live) >= 20
    assert worst[0] <= LIVE_LATENCY_S


def test_sighup_reloads_a_changed_config_and_refuses_an_invalid_one(site: Site) -> None:
    """Uplink down, two devices at 100 ms; SIGHUP with the uplink back, four devices at 50 ms;
    then SIGHUP with a broken file: logged, ignored, the gateway runs on."""
    nowhere = f"mqtt://{LOOPBACK}:{free_port()}"
    gateway = site.start_gateway(site.config(nowhere, poll="100ms", devices=FAULT_DEVICES[:2]))
    before = wait_local_health(site.local_port, lambda h: h["buffer"]["records"] >= 30)
    assert before["uplink"]["state"] != "connected"

    site.programs.config("gateway", site.config(poll="50ms"))
    site.fault("SIGHUP: uplink back, two more devices, faster polls")
    gateway.signal(signal.SIGHUP)
    buffered_before = {(d, s) for d, last in before["last_seq"].items() for s in range(1, last + 1)}
    site.tally.wait_all(buffered_before)
    wait_until(lambda: site.tally.distinct(FAULT_DEVICES[3]) >= 10, 30, "records of a device added by the reload")
    assert "reloading config" in gateway.log()

    site.programs.config(
        "gateway", site.config(poll="50ms").replace('poll_interval = "50ms"', 'poll_interval = "soon"')
    )
    site.fault("SIGHUP with an invalid config")
    gateway.signal(signal.SIGHUP)
    wait_until(lambda: "config reload refused; running on" in gateway.log(), 20, "the refusal in the log")
    site.tally.wait_more(80)  # still delivering, on the old config
    assert gateway.running
    health = site.stop_and_check()
    assert health["uplink"]["connects"] >= 1
    assert set(health["last_seq"]) == set(FAULT_DEVICES)
