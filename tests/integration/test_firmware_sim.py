"""firmware-sim against real clients: pymodbus over TCP, the CLI as a process, smtplib.

Register words are decoded here with ``struct``, independently of both the
simulator's encoder and the gateway's decoder.
"""

from __future__ import annotations

import asyncio
import email
import smtplib
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.pdu import ModbusPDU

from firmware_sim import SimulatorError
from firmware_sim.config import load_sim_config
from firmware_sim.fleet import SimFleet
from firmware_sim.mailcatcher import MailCatcher

T = TypeVar("T")

DEADLINE = 5.0  # seconds; every wait in this file is bounded by it

CONFIG = """
seed = 1
[[servers]]
name = "line1"
port = {port}
  [[servers.devices]]
  unit = 1
    [[servers.devices.registers]]
    address = 0
    type = "float32"
    signal = {{ kind = "constant", value = 1.5 }}
    [[servers.devices.registers]]
    address = 2
    type = "int16"
    scale = 0.1
    signal = {{ kind = "constant", value = -123.4 }}
    [[servers.devices.registers]]
    address = 3
    type = "uint32"
    signal = {{ kind = "constant", value = 70000 }}
    [[servers.devices.registers]]
    address = 10
    type = "float32"
    signal = {{ kind = "sine", offset = 50, amplitude = 10, period = "2s" }}
    [[servers.devices.registers]]
    address = 12
    type = "uint16"
    signal = {{ kind = "ramp", start = 0, slope = 100 }}
    [[servers.devices.registers]]
    address = 13
    type = "int32"
    signal = {{ kind = "constant", value = -100000 }}
    [[servers.devices.registers]]
    address = 0
    table = "input"
    type = "float32"
    signal = {{ kind = "constant", value = 230.5 }}
    [[servers.devices.registers]]
    address = 2
    table = "input"
    type = "uint16"
    signal = {{ kind = "constant", value = 7 }}
  [[servers.devices]]
  unit = 2
    [[servers.devices.registers]]
    address = 0
    signal = {{ kind = "constant", value = 42 }}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "sim.toml"
    path.write_text(CONFIG.format(port=port), encoding="utf-8")
    return path


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(DEADLINE):
            return await coro

    return asyncio.run(bounded())


def f32(words: list[int]) -> float:
    return float(struct.unpack(">f", struct.pack(">HH", *words))[0])


def i16(words: list[int]) -> int:
    return int(struct.unpack(">h", struct.pack(">H", *words))[0])


def u32(words: list[int]) -> int:
    return int(struct.unpack(">I", struct.pack(">HH", *words))[0])


def i32(words: list[int]) -> int:
    return int(struct.unpack(">i", struct.pack(">HH", *words))[0])


def ok(response: ModbusPDU) -> list[int]:
    assert not response.isError(), response
    return list(response.registers)


def exception_code(response: ModbusPDU) -> int:
    assert response.isError(), response
    return int(getattr(response, "exception_code", -1))


Body = Callable[[SimFleet, AsyncModbusTcpClient], Awaitable[None]]


async def with_fleet(tmp_path: Path, body: Body) -> None:
    port = free_port()
    async with SimFleet(load_sim_config(write_config(tmp_path, port))) as fleet:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        assert await client.connect()
        try:
            await body(fleet, client)
        finally:
            client.close()


# --- the fleet in-process ----------------------------------------------------------------


def test_holding_registers_decode_to_their_signals(tmp_path: Path) -> None:
    async def body(fleet: SimFleet, client: AsyncModbusTcpClient) -> None:
        words = ok(await client.read_holding_registers(0, count=5, device_id=1))
        assert f32(words[0:2]) == 1.5
        assert i16(words[2:3]) == -1234  # -123.4 / 0.1
        assert u32(words[3:5]) == 70000
        assert i32(ok(await client.read_holding_registers(13, count=2, device_id=1))) == -100000
        assert ok(await client.read_holding_registers(0, count=1, device_id=2)) == [42]

        # Time-varying signals: the value read lies between the signal just before
        # and just after the request (float32 and integer rounding aside).
        for address, decode, slack in ((10, f32, 0.01), (12, lambda w: w[0], 0.51)):
            width = 2 if address == 10 else 1
            before = fleet.value("line1", 1, address)
            read = decode(ok(await client.read_holding_registers(address, count=width, device_id=1)))
            after = fleet.value("line1", 1, address)
            assert min(before, after) - slack <= read <= max(before, after) + slack

        assert fleet.reads == 5

    run(with_fleet(tmp_path, body))


def test_sine_moves_between_reads(tmp_path: Path) -> None:
    async def body(fleet: SimFleet, client: AsyncModbusTcpClient) -> None:
        first = f32(ok(await client.read_holding_registers(10, count=2, device_id=1)))
        # Poll, not sleep: a new read returns a new value once the clock has moved.
        while (later := f32(ok(await client.read_holding_registers(10, count=2, device_id=1)))) == first:
            await asyncio.sleep(0.01)
        assert 40.0 <= later <= 60.0

    run(with_fleet(tmp_path, body))


def test_input_registers_are_a_separate_table(tmp_path: Path) -> None:
    async def body(fleet: SimFleet, client: AsyncModbusTcpClient) -> None:
        words = ok(await client.read_input_registers(0, count=3, device_id=1))
        assert f32(words[0:2]) == 230.5
        assert words[2] == 7
        assert fleet.value("line1", 1, 0, table="input") == 230.5
        assert f32(ok(await client.read_holding_registers(0, count=2, device_id=1))) == 1.5
        assert exception_code(await client.read_input_registers(3, count=1, device_id=1)) == 2
        assert exception_code(await client.read_input_registers(0, count=1, device_id=2)) == 2

    run(with_fleet(tmp_path, body))


def test_unknown_addresses_units_and_tables_answer_exceptions(tmp_path: Path) -> None:
    async def body(fleet: SimFleet, client: AsyncModbusTcpClient) -> None:
        read = client.read_holding_registers
        assert exception_code(await read(5, count=1, device_id=1)) == 2  # a gap
        assert exception_code(await read(4, count=2, device_id=1)) == 2  # into a gap
        assert exception_code(await read(15, count=1, device_id=1)) == 2  # past the end
        assert exception_code(await read(0, count=1, device_id=9)) == 11  # no such unit: gateway says so
        assert exception_code(await client.read_coils(0, count=1, device_id=1)) == 2  # not simulated
        # The server still answers normally afterwards.
        assert ok(await client.read_holding_registers(0, count=1, device_id=2)) == [42]
        assert fleet.reads == 1

    run(with_fleet(tmp_path, body))


def test_written_registers_keep_the_written_value(tmp_path: Path) -> None:
    async def body(fleet: SimFleet, client: AsyncModbusTcpClient) -> None:
        assert not (await client.write_register(0, 1000, device_id=2)).isError()
        assert ok(await client.read_holding_registers(0, count=1, device_id=2)) == [1000]

        # A float32 sine overwritten with a value the sine never reaches (40..60).
        words = list(struct.unpack(">HH", struct.pack(">f", 1000.25)))
        assert not (await client.write_registers(10, words, device_id=1)).isError()
        for _ in range(3):
            assert f32(ok(await client.read_holding_registers(10, count=2, device_id=1))) == 1000.25
        assert fleet.register("line1", 1, 10).written == words
        assert 40.0 <= fleet.value("line1", 1, 10) <= 60.0  # value() still reports the signal

        # Writing one word of a 32-bit value pins both; the other keeps its current word.
        assert not (await client.write_register(4, 0x0001, device_id=1)).isError()
        assert u32(ok(await client.read_holding_registers(3, count=2, device_id=1))) == 0x0001_0001
        # Neighbours are untouched.
        assert f32(ok(await client.read_holding_registers(0, count=2, device_id=1))) == 1.5

        # Input registers cannot be written (there is no function for it), holding gaps neither.
        assert exception_code(await client.write_register(5, 1, device_id=1)) == 2

    run(with_fleet(tmp_path, body))


def test_a_busy_port_fails_start_and_stops_the_others(tmp_path: Path) -> None:
    config = load_sim_config(write_config(tmp_path, free_port()))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        second = config.servers[0].model_copy(update={"name": "line2", "port": busy})
        config = config.model_copy(update={"servers": [config.servers[0], second]})
        fleet = SimFleet(config)

        async def start() -> None:
            with pytest.raises(SimulatorError, match=rf"'line2' cannot listen on 127\.0\.0\.1:{busy}"):
                await fleet.start()
            # line1 was listening and has been stopped again: its port is free.
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", config.servers[0].port))

        run(start())


# --- the CLI as a process --------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "firmware_sim.cli", *args]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), check=False, capture_output=True, text=True, timeout=DEADLINE)


async def read_when_up(port: int, proc: subprocess.Popen[str]) -> list[int]:
    """Poll until the process serves a read (it must not exit meanwhile)."""
    while True:
        assert proc.poll() is None, "firmware-sim exited early"
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
        try:
            if await client.connect():
                return ok(await client.read_holding_registers(0, count=2, device_id=1))
        finally:
            client.close()
        await asyncio.sleep(0.05)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.terminate()  # SIGTERM
    try:
        _, stderr = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, stderr


def test_run_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    proc = subprocess.Popen(
        cli("run", "--config", str(config), "--log-format", "kv"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert f32(run(read_when_up(port, proc))) == 1.5
    finally:
        code, stderr = stop(proc)
    assert code == 0, stderr
    assert f'msg="modbus server listening" server=line1 host=127.0.0.1 port={port} units=1,2' in stderr


def test_run_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(CONFIG.format(port=0), encoding="utf-8")
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{path}: servers[0].port: must be 1..65535, got 0"]


def test_check_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    broken = CONFIG.format(port=15020).replace("value = 42 }", "value = 42, noise = 1 }")
    bad.write_text(broken, encoding="utf-8")
    result = run_cli("check-config", str(bad))
    assert result.returncode == 1
    key = "servers[0].devices[1].registers[0].signal.noise"
    assert result.stdout.splitlines() == [f"{bad}: {key}: unknown key"]

    good = write_config(tmp_path, 15020)
    result = run_cli("check-config", str(good))
    assert (result.returncode, result.stdout) == (0, f"{good}: ok\n")


# --- mail ----------------------------------------------------------------------------------


def send_mail(port: int, subject: str) -> None:
    message = EmailMessage()
    message["From"] = "alerts@fieldlink.test"
    message["To"] = "ops@fieldlink.test"
    message["Subject"] = subject
    message.set_content("boiler-1 temperature 96.5 > 95")
    with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as smtp:
        smtp.send_message(message, to_addrs=["ops@fieldlink.test", "oncall@fieldlink.test"])


def wait_for_files(folder: Path, count: int) -> list[Path]:
    deadline = time.monotonic() + DEADLINE
    while len(files := sorted(folder.glob("*.eml"))) < count:
        assert time.monotonic() < deadline, f"{len(files)} of {count} mails in {folder}"
        time.sleep(0.02)
    return files


def test_mailcatcher_saves_each_mail_as_eml(tmp_path: Path) -> None:
    folder = tmp_path / "mail"
    with MailCatcher(folder, port=free_port()) as catcher:
        send_mail(catcher.port, "ALERT boiler-1 over temperature")
        send_mail(catcher.port, "RESOLVED boiler-1")
        files = wait_for_files(folder, 2)
        assert catcher.count == 2
    assert files == catcher.files()
    assert [f.name.endswith(f"-{n:06d}.eml") for n, f in enumerate(files, start=1)] == [True, True]
    first = email.message_from_bytes(files[0].read_bytes())
    assert first["Subject"] == "ALERT boiler-1 over temperature"
    assert first["X-Envelope-To"] == "ops@fieldlink.test, oncall@fieldlink.test"
    assert "96.5 > 95" in first.get_payload()
    assert email.message_from_bytes(files[1].read_bytes())["Subject"] == "RESOLVED boiler-1"


def test_mailcatcher_cli_runs_until_sigterm(tmp_path: Path) -> None:
    port, folder = free_port(), tmp_path / "mail"
    proc = subprocess.Popen(
        cli("mailcatcher", "--port", str(port), "--folder", str(folder)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while True:  # ready when it accepts a mail
            assert proc.poll() is None, "mailcatcher exited early"
            try:
                send_mail(port, "hello")
                break
            except OSError:
                assert time.monotonic() < deadline, "mailcatcher did not come up"
                time.sleep(0.05)
        assert len(wait_for_files(folder, 1)) == 1
    finally:
        code, stderr = stop(proc)
    assert code == 0, stderr
    recipients = "to=ops@fieldlink.test,oncall@fieldlink.test"
    assert f'msg="mail received" from=alerts@fieldlink.test {recipients}' in stderr
    assert "subject=hello" in stderr
