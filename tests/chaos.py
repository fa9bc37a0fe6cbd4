"""A randomized fault campaign over the whole data path: `make chaos`, or

    .venv/bin/python -m tests.chaos [--duration 180] [--seed N] [--faults N] [--workdir DIR] [--keep]

firmware-sim (4 Modbus devices, 50-100 ms polls) -> fieldlink-gateway -> FaultProxy
-> Debian mosquitto (persistence on) -> fieldlink-cloud (embedded SQLite store; it
connects to mosquitto directly, not through the proxy).

For `--duration` seconds it injects `--faults` faults (at least 20), one at a time,
at seeded random moments, each drawn from: kill -9 of the gateway and a restart,
mosquitto stopped and started, the link stalled for longer than the gateway's
ack_timeout then passing, the link cut, the link refused (and cut) then passing,
a SIGHUP reload (poll interval toggled; sometimes an invalid file first, which must
be refused), and a SIGTERM of the gateway (drain) and a restart. Then it lets
everything drain (bounded waits), stops the programs and compares:

- produced: every (device, seq) the gateway's buffer handed out (its sequence table);
- stored: the distinct (device, seq) in the cloud's store (`fieldlink-cloud query`);
- duplicates_stored: rows stored more than once for the same (device, seq, metric).
  The store's primary key is (site, gateway, device, metric, ts), so a record that
  arrives twice overwrites its own rows and cannot be stored twice; an extra row for
  the same (device, seq) would mean the gateway sent one seq with two different
  timestamps (a seq handed out twice). Duplicates *received* by the cloud are
  reported separately from its health counters (records received - records stored,
  and the deduplicator's `duplicates_dropped`).

The last line of stdout is exactly
`chaos faults=<n> produced=<n> lost=<n> duplicates_stored=<n>`; the exit code is 0
only if nothing was lost (and the campaign itself ran through).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fieldlink.snapshot import LAST_HEALTH_FILE
from tests.integration.fleet import (
    SQLITE_STORE,
    cloud_ready,
    cloud_rows,
    cloud_toml,
    counter_sim_toml,
    counter_source,
    gateway_toml,
    produced,
    wait_local_health,
    with_keys,
)
from tests.rig import LOOPBACK, Mosquitto, MqttProbe, free_port
from tests.rig.programs import Program, Programs
from tests.rig.proxy import FaultProxy

ACK_TIMEOUT = 3.0
UPLINK_KEYS = f"""
ack_timeout = "{ACK_TIMEOUT:g}s"
connect_timeout = "3s"
max_inflight = 20
batch_max_records = 200
"""
POLLS = ("50ms", "100ms")
DRAIN_TIMEOUT = 180.0  # the end: the gateway's buffer empties, then the cloud stores everything
CAUGHT_UP_RECORDS = 100  # what live traffic keeps in flight; the drain at SIGTERM takes the rest
FAULT_KINDS = {  # kind: weight
    "kill9": 3,
    "broker": 2,
    "stall": 2,
    "cut": 3,
    "refuse": 2,
    "sighup": 2,
    "sigterm": 2,
}


class Campaign:
    def __init__(self, workdir: Path, seed: int, duration: float, faults: int) -> None:
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.seed, self.duration, self.planned = seed, duration, faults
        self.programs = Programs(workdir / "programs")
        self.mosquitto = Mosquitto(workdir / "mosquitto")
        self.proxy: FaultProxy | None = None
        self.modbus_port, self.local_port = free_port(), free_port()
        self.gateway_state = workdir / "gateway"
        self.cloud_state = workdir / "cloud"
        self.poll = POLLS[0]
        self.gateway: Program | None = None
        self.cloud: Program | None = None
        self.injected = 0
        self.refused_reloads = 0
        self.unexpected: list[str] = []  # programs that exited on their own
        self.started = time.monotonic()

    # --- output ----------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", flush=True)

    def gateway_status(self) -> str:
        try:
            h = wait_local_health(self.local_port, lambda h: True, timeout=3)
        except (OSError, TimeoutError):
            return "gateway health: n/a"
        up = h["uplink"]
        return (
            f"buffer={h['buffer']['records']} delivered={h['records_delivered']} uplink={up['state']} "
            f"replaying={up['replaying']} dead_links={up['dead_links']}"
        )

    # --- set-up ----------------------------------------------------------------------

    def gateway_config(self, poll: str) -> str:
        assert self.proxy is not None
        source = counter_source("pumps", self.modbus_port, poll)
        text = gateway_toml(self.gateway_state, self.local_port, self.proxy.url, source)
        return with_keys(text, "uplink", UPLINK_KEYS)

    def start(self) -> None:
        self.mosquitto.start()
        self.proxy = FaultProxy(self.mosquitto.host, self.mosquitto.port)
        self.proxy.start()
        sim = self.programs.simulator(counter_sim_toml(self.modbus_port))
        sim.start().wait_port(self.modbus_port)
        self.cloud = self.programs.cloud(cloud_toml(self.cloud_state, self.mosquitto.url, SQLITE_STORE))
        with MqttProbe(LOOPBACK, self.mosquitto.port, ["fl-cloud/#"]) as probe:
            self.cloud.start()
            cloud_ready(probe)  # its persistent session exists before the first record is sent
        self.gateway = self.programs.gateway(self.gateway_config(self.poll))
        self.gateway.start().wait_port(self.local_port)
        self.say(f"running: workdir {self.workdir}, seed {self.seed}, {self.planned} faults in {self.duration:g} s")

    # --- faults ----------------------------------------------------------------------

    def hold(self, low: float, high: float) -> float:
        """How long a fault lasts (part of the campaign's random schedule, not a synchronisation)."""
        seconds = self.rng.uniform(low, high)
        time.sleep(seconds)
        return seconds

    def restart_gateway(self) -> None:
        assert self.gateway is not None
        self.gateway.start().wait_port(self.local_port)

    def kill9(self) -> str:
        assert self.gateway is not None
        code = self.gateway.kill()
        self.restart_gateway()
        return f"gateway kill -9 (exit {code}) and restart"

    def sigterm(self) -> str:
        assert self.gateway is not None
        code = self.gateway.stop()
        if code != 0:
            raise RuntimeError(f"gateway exited with {code} on SIGTERM")
        self.restart_gateway()
        return "gateway SIGTERM (drain, exit 0) and restart"

    def broker(self) -> str:
        code = self.mosquitto.stop()
        held = self.hold(1.0, 4.0)
        self.mosquitto.start()
        return f"mosquitto stopped (exit {code}) for {held:.1f} s, started again"

    def stall(self) -> str:
        assert self.proxy is not None
        self.proxy.stall()
        held = self.hold(ACK_TIMEOUT + 1.0, ACK_TIMEOUT + 4.0)
        self.proxy.pass_()
        return f"link stalled for {held:.1f} s (ack_timeout {ACK_TIMEOUT:g} s), passes again"

    def cut(self) -> str:
        assert self.proxy is not None
        self.proxy.cut()
        return "link cut (RST both ways)"

    def refuse(self) -> str:
        assert self.proxy is not None
        self.proxy.refuse()
        self.proxy.cut()
        held = self.hold(1.0, 4.0)
        self.proxy.pass_()
        return f"link refused and cut for {held:.1f} s, passes again"

    def sighup(self) -> str:
        assert self.gateway is not None
        note = ""
        if self.rng.random() < 1 / 3:
            refusals = self.gateway.log().count("config reload refused")
            broken = self.gateway_config(self.poll).replace("poll_interval = ", "poll_interval = -", 1)
            self.programs.config("gateway", broken)
            self.gateway.signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while self.gateway.log().count("config reload refused") <= refusals:
                if time.monotonic() > deadline or not self.gateway.running:
                    raise RuntimeError("an invalid config was not refused (or the gateway died)")
                time.sleep(0.1)
            self.refused_reloads += 1
            note = "an invalid config refused, then "
        self.poll = POLLS[1] if self.poll == POLLS[0] else POLLS[0]
        self.programs.config("gateway", self.gateway_config(self.poll))
        self.gateway.signal(signal.SIGHUP)
        return f"SIGHUP: {note}reload with poll_interval {self.poll}"

    def check_alive(self) -> None:
        """A program that exited by itself is a finding: reported (the workdir is kept), then restarted."""
        for program in (self.gateway, self.cloud):
            assert program is not None
            if not program.running:
                code = program.process.poll() if program.process else None
                self.unexpected.append(f"{program.name} exited by itself with code {code}")
                self.say(f"UNEXPECTED: {program.name} exited by itself with code {code}; restarting it")
                program.start()

    def run_faults(self) -> None:
        kinds = list(FAULT_KINDS)
        weights = [FAULT_KINDS[k] for k in kinds]
        # Every kind at least once, the rest drawn by weight, all in random order.
        plan = kinds + self.rng.choices(kinds, weights, k=max(0, self.planned - len(kinds)))
        self.rng.shuffle(plan)
        begin = time.monotonic()
        for i, kind in enumerate(plan):
            slot = self.duration / len(plan)
            due = begin + slot * (i + self.rng.uniform(0.2, 0.8))
            time.sleep(max(0.0, due - time.monotonic()))  # the campaign's clock
            self.check_alive()
            description = getattr(self, kind)()
            self.injected += 1
            self.say(f"fault {self.injected}/{len(plan)}: {description}; {self.gateway_status()}")

    # --- the end ---------------------------------------------------------------------

    def drain(self) -> None:
        assert self.proxy is not None
        assert self.gateway is not None
        assert self.cloud is not None
        self.proxy.pass_()
        if not self.mosquitto.running:
            self.mosquitto.start()
        self.check_alive()
        self.gateway.wait_port(self.local_port)
        self.say("faults over; draining")
        since_ms = time.time_ns() // 1_000_000
        health = wait_local_health(
            self.local_port,
            # A fresh report (the retained one may predate the last fault): connected, backlog replayed.
            lambda h: (
                h["ts"] > since_ms
                and h["uplink"]["state"] == "connected"
                and not h["uplink"]["replaying"]
                and h["buffer"]["records"] <= CAUGHT_UP_RECORDS
            ),
            timeout=DRAIN_TIMEOUT,
        )
        self.say(f"caught up: {self.gateway_status()} (uplink connects this run: {health['uplink']['connects']})")
        code = self.gateway.stop()
        self.say(f"gateway stopped (exit {code}); left in its buffer: {self.left_in_buffer()}")
        expected = produced(self.gateway_state)
        config = self.programs.workdir / "cloud.toml"
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            stored = {(r["device"], r["seq"]) for r in cloud_rows(config)}
            if expected <= stored or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        self.say(f"cloud has {len(stored & expected)} of {len(expected)} records")

    def left_in_buffer(self) -> object:
        try:
            return json.loads((self.gateway_state / LAST_HEALTH_FILE).read_text())["buffer"]["messages"]
        except (OSError, ValueError, KeyError):
            return "?"

    def summary(self) -> tuple[int, int, int]:
        """(produced, lost, duplicates_stored), with the details on the lines before."""
        expected = produced(self.gateway_state)
        rows = cloud_rows(self.programs.workdir / "cloud.toml")
        stored = {(r["device"], r["seq"]) for r in rows}
        per_metric = Counter((r["device"], r["seq"], r["metric"]) for r in rows)
        duplicates_stored = sum(n - 1 for n in per_metric.values() if n > 1)
        lost = sorted(expected - stored)
        unexpected = sorted(stored - expected)
        cloud = json.loads((self.cloud_state / LAST_HEALTH_FILE).read_text())
        received_twice = cloud["records"] - cloud["records_stored"] - cloud["records_rejected"]
        self.say(
            f"cloud: records received {cloud['records']}, stored {cloud['records_stored']}, "
            f"rejected {cloud['records_rejected']}, duplicates received {received_twice} "
            f"(dropped by its dedup: {cloud['duplicates_dropped']}), bad messages {cloud['bad_messages']}"
        )
        self.say(f"proxy: {self.proxy!r}; refused reloads {self.refused_reloads}")
        for finding in self.unexpected:
            self.say(f"UNEXPECTED: {finding}")
        if lost:
            self.say(f"LOST {len(lost)}: {lost[:50]}")
        if unexpected:
            self.say(f"stored but never produced: {len(unexpected)}: {unexpected[:20]}")
        return len(expected), len(lost), duplicates_stored

    def stop(self) -> None:
        """Stop everything we started, each by its own handle; never raises."""
        for step in (self.programs.stop_all, self.proxy.stop if self.proxy else None, self.mosquitto.stop):
            if step is None:
                continue
            try:
                step()
            except Exception:
                traceback.print_exc()


def _guarded(what: str, step: Callable[[], None], campaign: Campaign) -> bool:
    try:
        step()
    except BaseException as exc:  # pytest.skip/fail of the rig (a missing mosquitto) included
        if isinstance(exc, KeyboardInterrupt):
            raise
        campaign.say(f"{what} failed: {exc!r}")
        traceback.print_exc(file=sys.stdout)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of faults (default 180)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock, printed)")
    parser.add_argument("--faults", type=int, default=None, help="how many faults (default: one per 7.5 s, >= 20)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir even when nothing was lost")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    faults = args.faults if args.faults is not None else max(20, round(args.duration / 7.5))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fieldlink-chaos-"))
    campaign = Campaign(workdir, seed, args.duration, max(faults, len(FAULT_KINDS)))

    ran = False
    result: tuple[int, int, int] | None = None
    try:
        if _guarded("set-up", campaign.start, campaign):
            ran = _guarded("faults", campaign.run_faults, campaign)
            ran = _guarded("drain", campaign.drain, campaign) and ran
    finally:
        campaign.stop()
    try:
        result = campaign.summary()
    except Exception as exc:
        campaign.say(f"no summary: {exc!r}")
    ok = ran and result is not None and result[1] == 0
    if ok and not campaign.unexpected and args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        campaign.say(f"logs and data kept in {workdir}")
    produced_n, lost, duplicates_stored = result if result is not None else (0, -1, 0)
    print(f"chaos faults={campaign.injected} produced={produced_n} lost={lost} duplicates_stored={duplicates_stored}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
