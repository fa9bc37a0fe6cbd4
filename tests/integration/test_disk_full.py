"""A gateway whose state dir is on a small, filling file system keeps running and loses only what it counts.

The state dir is a tmpfs of a few MB (tests/rig/smallfs.py); the uplink points at a
closed port, so the buffer only grows: firmware-sim devices polled fast, and a local
application publishing batches through the gateway's embedded broker. max_bytes is far
above what the disk can hold, so min_free_disk (or the disk refusing a write) is the
bound that bites. Then a mosquitto broker drains the buffer completely.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fieldlink.snapshot import LAST_HEALTH_FILE, read_snapshot
from fieldlink.wire import Record, Value, encode_batch
from tests.integration.fleet import (
    CLOUD_DATA_TOPICS,
    GATEWAY,
    SITE,
    gateway_toml,
    modbus_source,
    sim_toml,
    wire_records,
)
from tests.rig import Mosquitto, MqttProbe, ProbeMessage, free_port
from tests.rig.programs import Program, Programs
from tests.rig.smallfs import fill, free_bytes, require_small_filesystem

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HEALTH = f"fl/{SITE}/{GATEWAY}/health"
FS_SIZE = 16 << 20
RECORDS_PER_BATCH = 200
PUBLISHER_DEVICE = "lab-logger"


def _health(messages: list[ProbeMessage]) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if m.topic == HEALTH]


def wait_health(probe: MqttProbe, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
    """The first health report from now on that satisfies ``predicate``."""
    start = len(probe.messages)
    messages = probe.wait_for(lambda ms: any(predicate(h) for h in _health(ms[start:])), timeout=timeout)
    return next(h for h in _health(messages[start:]) if predicate(h))


def buffer_toml(eviction: str, min_free_disk: int) -> str:
    return f"""
[buffer]
max_bytes = "10GB"
min_free_disk = {min_free_disk}
eviction = "{eviction}"
"""


def gateway_config(state_dir: Path, local_port: int, uplink_url: str, sources: str, buffer: str) -> str:
    # Stopping with the uplink down waits drain_timeout for nothing: keep it short.
    text = gateway_toml(state_dir, local_port, uplink_url, sources).replace(
        'drain_timeout = "10s"', 'drain_timeout = "1s"'
    )
    return text + buffer


class LocalPublisher:
    """A local application publishing batch envelopes on its telemetry topic through the gateway (QoS 1)."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.records = 0
        self.topic = f"fl/{SITE}/{GATEWAY}/dev/{PUBLISHER_DEVICE}/telemetry"

    def publish(self, batches: int) -> None:
        for _ in range(batches):
            now = time.time_ns() // 1_000_000
            records = [
                Record(
                    SITE,
                    GATEWAY,
                    PUBLISHER_DEVICE,
                    1,  # the gateway gives its own sequence numbers
                    now,
                    {"flow": Value.of(12.5 + i, "m3/h"), "note": Value.of(f"sample {i} " + "x" * 120)},
                )
                for i in range(RECORDS_PER_BATCH)
            ]
            info = self.client.publish(self.topic, encode_batch(SITE, GATEWAY, records), qos=1)
            info.wait_for_publish(timeout=20)
            assert info.is_published(), "the gateway's local broker did not acknowledge a batch"
            self.records += RECORDS_PER_BATCH

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextmanager
def local_publisher(port: int) -> Iterator[LocalPublisher]:
    publisher = LocalPublisher(port)
    try:
        yield publisher
    finally:
        publisher.close()


def buffered_rows(db: Path) -> set[tuple[str, int]]:
    """(device, seq) of every telemetry record in a buffer file (read-only, beside a running gateway)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT device, seq FROM messages WHERE priority = 0").fetchall()
    finally:
        conn.close()
    assert all(device is not None and seq is not None for device, seq in rows)
    return set(rows)


def control_rows(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM messages WHERE priority > 0").fetchone()[0]
    finally:
        conn.close()


def fill_up(path: Path) -> list[Path]:
    """Fill the file system at ``path`` to the last block, beside a gateway that writes too."""
    try:
        fill(path, 0)
    except OSError as exc:  # the gateway took some of the space between statvfs and our write
        if exc.errno != errno.ENOSPC:
            raise
    fillers = list(path.glob(".filler-*"))
    assert fillers
    assert free_bytes(path) == 0
    return fillers


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def drain_into(
    programs: Programs,
    gateway: Program,
    mosquitto: Mosquitto,
    config: str,
    expected: set[tuple[str, int]],
    local_port: int,
) -> dict[str, Any]:
    """Start ``gateway`` on ``config`` (uplink at ``mosquitto``) and wait until every expected record arrived."""
    with MqttProbe("127.0.0.1", mosquitto.port, CLOUD_DATA_TOPICS) as cloud:
        programs.config(gateway.name, config)
        gateway.start().wait_port(local_port)
        with MqttProbe("127.0.0.1", local_port, [HEALTH]) as local:
            cloud.wait_for(lambda ms: set(wire_records(ms)) >= expected, timeout=60)
            drained = wait_health(local, lambda h: h["buffer"]["messages"] == 0 and h["uplink"]["inflight"] == 0)
        delivered = set(wire_records(cloud.messages))
    assert delivered == expected, "records the buffer did not hold reached the cloud"
    return drained


@pytest.mark.parametrize("eviction", ["drop-oldest", "reject-new"])
def test_a_filling_disk_drops_per_policy_and_the_buffer_drains_completely_afterwards(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path, eviction: str
) -> None:
    modbus_port, local_port = free_port(), free_port()
    programs.simulator(sim_toml(modbus_port)).start().wait_port(modbus_port)
    unreachable_cloud = f"mqtt://127.0.0.1:{free_port()}"
    with require_small_filesystem(tmp_path / "state", FS_SIZE) as state:
        db = state / "buffer.db"
        min_free = free_bytes(state) - (8 << 20)  # the buffer file, and its WAL (up to ~4 MB between checkpoints)
        sources = modbus_source("line", modbus_port, poll="50ms")
        buffer = buffer_toml(eviction, min_free)
        gateway = programs.gateway(gateway_config(state, local_port, unreachable_cloud, sources, buffer))
        gateway.start().wait_port(local_port)
        with MqttProbe("127.0.0.1", local_port, [HEALTH]) as probe, local_publisher(local_port) as publisher:
            wait_health(probe, lambda h: h["records_buffered"] > 0 and h["devices"].get("boiler-1") == "online")
            deadline = time.monotonic() + 60
            while True:
                publisher.publish(5)
                health = _health(probe.messages)[-1]
                if health["drops"]["min_free_disk"] + health["drops"]["write_error"] > 0:
                    break
                assert time.monotonic() < deadline, f"the bound never bit: {health}"
            first = wait_health(probe, lambda h: h["drops"]["min_free_disk"] + h["drops"]["write_error"] > 0)
            # Keep the pressure up: twice as much again as the buffer holds.
            publisher.publish(2 * first["buffer"]["records"] // RECORDS_PER_BATCH + 1)
            later = wait_health(
                probe,
                lambda h: (
                    h["records_buffered"] + h["readings_dropped"] >= publisher.records and h["ts"] > first["ts"] + 1000
                ),
                timeout=60,
            )
            assert gateway.running
            assert later["devices"] == {"boiler-1": "online", "meter-1": "online"}, "still polling"
            assert later["sources"]["line"]["requests"] > first["sources"]["line"]["requests"]
            assert later["drops"]["max_bytes"] == 0
            assert later["control_drops"] == 0
            assert later["buffer"]["bytes"] <= FS_SIZE - min_free
            assert free_bytes(state) > 0, "the disk filled up: min_free_disk did not hold"
        assert gateway.stop() == 0
        # The health report written at the stop: inputs stopped and the buffer flushed, so it is exact.
        final = read_snapshot(state / LAST_HEALTH_FILE)
        assert integrity(db) == "ok"
        kept = buffered_rows(db)
        assert len(kept) == final["buffer"]["records"] >= 1000
        assert final["control_drops"] == 0
        assert final["drops"]["max_bytes"] == final["drops"]["max_age"] == 0
        evicted = final["records_buffered"] - final["buffer"]["records"]
        # Every message lost is counted once: refused at the door, failed to write, or evicted. (A poll
        # in flight when the stop cancelled its device task is buffered without counting in
        # records_buffered: up to one per device.)
        unexplained = sum(final["drops"].values()) - (final["readings_dropped"] + final["states_dropped"] + evicted)
        assert 0 <= unexplained <= len(final["devices"])
        if eviction == "reject-new":
            # Refused at the door: the records already buffered stay. (A device status message,
            # should a device flap under load, is admitted by evicting some.)
            assert final["readings_dropped"] > first["buffer"]["records"]
            assert evicted * 10 < final["readings_dropped"]
        else:
            # Admitted, and the oldest evicted to make room: the newest are kept.
            assert evicted > first["buffer"]["records"]
            assert final["readings_dropped"] + final["states_dropped"] == final["drops"]["write_error"]
            newest = max(seq for device, seq in kept if device == PUBLISHER_DEVICE)
            assert (PUBLISHER_DEVICE, newest) in kept
            assert (PUBLISHER_DEVICE, 1) not in kept
        # The cloud broker is reachable now; the gateway starts without sources: it only drains.
        programs.stop_all()
        drain_config = gateway_config(state, local_port, mosquitto.url, sources="", buffer=buffer)
        drained = drain_into(programs, gateway, mosquitto, drain_config, kept, local_port)
        assert drained["buffer"]["records"] == 0
        assert drained["drops"] == dict.fromkeys(drained["drops"], 0)
        assert gateway.stop() == 0
        assert integrity(db) == "ok"
        assert buffered_rows(db) == set()
        assert control_rows(db) == 0


def test_a_sighup_onto_a_reachable_broker_drains_a_buffer_that_hit_min_free_disk(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    local_port = free_port()
    unreachable_cloud = f"mqtt://127.0.0.1:{free_port()}"
    with require_small_filesystem(tmp_path / "state", FS_SIZE) as state:
        db = state / "buffer.db"
        buffer = buffer_toml("reject-new", free_bytes(state) - (8 << 20))
        gateway = programs.gateway(gateway_config(state, local_port, unreachable_cloud, "", buffer))
        gateway.start().wait_port(local_port)
        with MqttProbe("127.0.0.1", local_port, [HEALTH]) as probe, local_publisher(local_port) as publisher:
            deadline = time.monotonic() + 60
            while not any(h["drops"]["min_free_disk"] for h in _health(probe.messages)):
                publisher.publish(5)
                assert time.monotonic() < deadline, "the bound never bit"
            settled = wait_health(probe, lambda h: h["records_buffered"] + h["readings_dropped"] == publisher.records)
        assert settled["readings_dropped"] > 0
        kept = buffered_rows(db)
        assert len(kept) == settled["buffer"]["records"] == settled["records_buffered"]
        with MqttProbe("127.0.0.1", mosquitto.port, CLOUD_DATA_TOPICS) as cloud:
            programs.config(gateway.name, gateway_config(state, local_port, mosquitto.url, "", buffer))
            assert gateway.process is not None
            os.kill(gateway.process.pid, signal.SIGHUP)
            cloud.wait_for(lambda ms: set(wire_records(ms)) >= kept, timeout=60)
            with MqttProbe("127.0.0.1", local_port, [HEALTH]) as local:
                wait_health(local, lambda h: h["buffer"]["messages"] == 0 and h["uplink"]["inflight"] == 0)
            assert set(wire_records(cloud.messages)) == kept
        assert gateway.running
        assert gateway.stop() == 0
        assert "reloading config" in gateway.log()
        assert integrity(db) == "ok"
        assert buffered_rows(db) == set()


def test_a_completely_full_disk_is_a_write_error_and_the_gateway_recovers_when_space_returns(
    programs: Programs, tmp_path: Path
) -> None:
    modbus_port, local_port = free_port(), free_port()
    programs.simulator(sim_toml(modbus_port)).start().wait_port(modbus_port)
    unreachable_cloud = f"mqtt://127.0.0.1:{free_port()}"
    with require_small_filesystem(tmp_path / "state", FS_SIZE) as state:
        db = state / "buffer.db"
        sources = modbus_source("line", modbus_port, poll="20ms")
        gateway = programs.gateway(
            gateway_config(state, local_port, unreachable_cloud, sources, buffer_toml("drop-oldest", 0))
        )
        gateway.start().wait_port(local_port)
        with MqttProbe("127.0.0.1", local_port, [HEALTH]) as probe, local_publisher(local_port) as publisher:
            wait_health(probe, lambda h: h["records_buffered"] > 0)
            publisher.publish(5)  # a buffer file of some size first
            fillers = fill_up(state)  # the operator's log files ate the disk
            failing = wait_health(probe, lambda h: h["drops"]["write_error"] > 0 and h["buffer_write_failures"] > 0)
            later = wait_health(probe, lambda h: h["ts"] > failing["ts"] + 1000)
            assert gateway.running
            assert later["drops"]["write_error"] > failing["drops"]["write_error"], "still polling, still counting"
            assert later["readings_dropped"] > 0
            assert later["devices"] == {"boiler-1": "online", "meter-1": "online"}
            # Space comes back: the gateway writes again without a restart.
            for filler in fillers:
                filler.unlink()
            recovered = wait_health(probe, lambda h: h["buffer_write_failures"] == 0)
            steady = wait_health(probe, lambda h: h["ts"] > recovered["ts"] + 1000)
            again = wait_health(probe, lambda h: h["records_buffered"] > steady["records_buffered"] + 20)
            assert again["drops"]["write_error"] == steady["drops"]["write_error"], "still failing"
            publisher.publish(2)
            wait_health(probe, lambda h: h["records_buffered"] >= again["records_buffered"] + 2 * RECORDS_PER_BATCH)
        assert gateway.stop() == 0
        final = read_snapshot(state / LAST_HEALTH_FILE)
        log = gateway.log()
        # Reported once per episode, not once per reading. (Should a commit squeeze through the
        # full disk into reused WAL space, that is an episode of its own.)
        episodes = log.count("buffer write failed")
        assert 1 <= episodes <= log.count("buffer writes again") + 1
        assert episodes * 20 < final["drops"]["write_error"]
        assert integrity(db) == "ok"
        assert len(buffered_rows(db)) == final["buffer"]["records"]


@pytest.mark.parametrize("how", ["stop", "reload"])
def test_a_gateway_stopped_or_reloaded_on_a_full_disk_exits_cleanly_and_keeps_its_buffer(
    programs: Programs, tmp_path: Path, how: str
) -> None:
    # An operator restarts the gateway (or reloads its config) while the disk is still full.
    local_port = free_port()
    unreachable_cloud = f"mqtt://127.0.0.1:{free_port()}"
    with require_small_filesystem(tmp_path / "state", FS_SIZE) as state:
        db = state / "buffer.db"
        config = gateway_config(state, local_port, unreachable_cloud, "", buffer_toml("reject-new", 0))
        gateway = programs.gateway(config)
        gateway.start().wait_port(local_port)
        with MqttProbe("127.0.0.1", local_port, [HEALTH]) as probe, local_publisher(local_port) as publisher:
            publisher.publish(3)
            before = wait_health(probe, lambda h: h["records_buffered"] == publisher.records)
            fill_up(state)
            publisher.publish(1)
            # reject-new: nothing is evicted, so the buffer must keep exactly what it had.
            wait_health(probe, lambda h: h["drops"]["write_error"] + h["drops"]["min_free_disk"] > 0)
        if how == "reload":
            assert gateway.process is not None
            os.kill(gateway.process.pid, signal.SIGHUP)
            deadline = time.monotonic() + 20
            while gateway.log().count("gateway running") < 2:
                assert gateway.running, f"a reload on a full disk ended the gateway:\n{gateway.log()[-3000:]}"
                assert time.monotonic() < deadline, "the reload did not finish"
                time.sleep(0.05)
            gateway.wait_port(local_port)
            with MqttProbe("127.0.0.1", local_port, [HEALTH]) as probe:
                reloaded = wait_health(probe, lambda h: True)
            assert reloaded["buffer"]["records"] == before["records_buffered"]
        assert gateway.stop() == 0, f"not a clean exit:\n{gateway.log()[-3000:]}"
        assert integrity(db) == "ok"
        assert len(buffered_rows(db)) == before["records_buffered"]
