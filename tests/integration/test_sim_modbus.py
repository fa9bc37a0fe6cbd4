"""firmware-sim against real pymodbus clients: TCP, RTU on a pty, RTU over TCP; faults; counters.

Words are decoded here with ``struct``, independently of the simulator's codec and
of the gateway's. Every wait is bounded by ``DEADLINE``; silence is observed as
the client's own timeout (``SILENCE`` seconds), never by sleeping.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from firmware_sim.config import load_sim_config
from firmware_sim.faults import Fault
from firmware_sim.fleet import SimFleet
from firmware_sim.protocol import crc16

T = TypeVar("T")
DEADLINE = 15.0
SILENCE = 0.3  # client timeout where a test expects no answer

UNIT_1 = """
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
    type = "uint64"
    byte_order = "CDAB"
    signal = {{ kind = "constant", value = 0x0102030405060708 }}
    [[servers.devices.registers]]
    address = 7
    type = "float64"
    byte_order = "HGFEDCBA"
    name = "setpoint"
    signal = {{ kind = "constant", value = 2.5 }}
    [[servers.devices.registers]]
    address = 11
    type = "string"
    length = 3
    byte_order = "BADC"
    signal = {{ kind = "constant", value = "SIM" }}
    [[servers.devices.registers]]
    address = 14
    type = "bool"
    bit = 0
    signal = {{ kind = "constant", value = 1 }}
    [[servers.devices.registers]]
    address = 14
    type = "bool"
    bit = 2
    signal = {{ kind = "step", values = [1], hold = "1h" }}
    [[servers.devices.registers]]
    address = 0
    table = "input"
    type = "int32"
    signal = {{ kind = "constant", value = -100000 }}
    [[servers.devices.registers]]
    address = 2
    table = "input"
    signal = {{ kind = "constant", value = 7 }}
    [[servers.devices.registers]]
    address = 0
    table = "coil"
    type = "bool"
    signal = {{ kind = "constant", value = 1 }}
    [[servers.devices.registers]]
    address = 1
    table = "coil"
    type = "bool"
    signal = {{ kind = "constant", value = 0 }}
    [[servers.devices.registers]]
    address = 2
    table = "coil"
    type = "bool"
    signal = {{ kind = "constant", value = 1 }}
    [[servers.devices.registers]]
    address = 10
    table = "discrete_input"
    type = "bool"
    signal = {{ kind = "constant", value = 1 }}
  [[servers.devices]]
  unit = 2
  count = 2
    [[servers.devices.registers]]
    address = 0
    signal = {{ kind = "constant", value = 42 }}
"""

CONFIG = (
    """
seed = 1
[[servers]]
name = "tcp"
port = {tcp_port}
"""
    + UNIT_1
    + """
[[servers]]
name = "rtu"
transport = "rtu"
serial_port = "{tmp}/ttySIM"
"""
    + UNIT_1
    + """
[[servers]]
name = "rtu_tcp"
transport = "rtu_tcp"
port = {rtu_tcp_port}
"""
    + UNIT_1
)

TRANSPORTS = ["tcp", "rtu", "rtu_tcp"]
Client = AsyncModbusTcpClient | AsyncModbusSerialClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "sim.toml"
    path.write_text(CONFIG.format(tcp_port=free_port(), rtu_tcp_port=free_port(), tmp=tmp_path), encoding="utf-8")
    return path


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(DEADLINE):
            return await coro

    return asyncio.run(bounded())


def client_for(
    fleet: SimFleet,
    transport: str,
    timeout: float,
    received: list[bytes] | None = None,
    connects: list[bool] | None = None,
) -> Client:
    """A client with no retries; ``received`` collects the raw bytes it gets, ``connects`` its (dis)connections."""

    def on_connect(connected: bool) -> None:
        if connects is not None:
            connects.append(connected)

    def trace(sending: bool, data: bytes) -> bytes:
        if not sending and received is not None:
            received.append(data)
        return data

    server = fleet.server(transport)
    if transport == "rtu":
        assert server.serial_port is not None
        return AsyncModbusSerialClient(
            server.serial_port,
            framer=FramerType.RTU,
            timeout=timeout,
            retries=0,
            trace_packet=trace,
            trace_connect=on_connect,
        )
    framer = FramerType.SOCKET if transport == "tcp" else FramerType.RTU
    assert server.port is not None
    return AsyncModbusTcpClient(
        "127.0.0.1",
        port=server.port,
        framer=framer,
        timeout=timeout,
        retries=0,
        trace_packet=trace,
        trace_connect=on_connect,
    )


Body = Callable[[SimFleet, Client], Awaitable[None]]


async def with_client(tmp_path: Path, transport: str, body: Body, timeout: float = 2.0, **kw: Any) -> None:
    async with SimFleet(load_sim_config(write_config(tmp_path))) as fleet:
        client = client_for(fleet, transport, timeout, **kw)
        assert await client.connect()
        try:
            await body(fleet, client)
        finally:
            client.close()


def ok(response: ModbusPDU) -> list[int]:
    assert not response.isError(), response
    return list(response.registers)


def exception_code(response: ModbusPDU) -> int:
    assert response.isError(), response
    return int(getattr(response, "exception_code", -1))


def unpack(fmt: str, words: list[int]) -> Any:
    (value,) = struct.unpack(fmt, struct.pack(f">{len(words)}H", *words))
    return value


async def times_out(request: Awaitable[ModbusPDU]) -> float:
    """Seconds until the client gave up waiting: the request must get no valid answer."""
    start = time.monotonic()
    with pytest.raises(ModbusException):
        await request
    return time.monotonic() - start


# --- every table, every transport ------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_table_reads(tmp_path: Path, transport: str) -> None:
    async def body(fleet: SimFleet, client: Client) -> None:
        words = ok(await client.read_holding_registers(0, count=15, device_id=1))
        assert unpack(">f", words[0:2]) == 1.5
        assert unpack(">h", words[2:3]) == -1234
        # CDAB: the words of 0x0102030405060708 in reverse order
        assert words[3:7] == [0x0708, 0x0506, 0x0304, 0x0102]
        little = b"".join(w.to_bytes(2, "big") for w in words[7:11])
        assert struct.unpack("<d", little)[0] == 2.5  # HGFEDCBA: little-endian bytes
        swapped = b"".join(w.to_bytes(2, "little") for w in words[11:14])
        assert swapped == b"SIM\0\0\0"  # BADC: first character in the low byte
        assert words[14] == 0b101  # two bools sharing a word

        inputs = ok(await client.read_input_registers(0, count=3, device_id=1))
        assert unpack(">i", inputs[0:2]) == -100000
        assert inputs[2] == 7
        coils = await client.read_coils(0, count=3, device_id=1)
        assert not coils.isError()
        assert coils.bits[:3] == [True, False, True]
        discrete = await client.read_discrete_inputs(10, count=1, device_id=1)
        assert not discrete.isError()
        assert discrete.bits[0] is True
        # Several units on one server (on RTU: one bus), made by `count = 2`.
        assert ok(await client.read_holding_registers(0, count=1, device_id=2)) == [42]
        assert ok(await client.read_holding_registers(0, count=1, device_id=3)) == [42]
        assert exception_code(await client.read_holding_registers(15, count=1, device_id=1)) == 2

        assert fleet.served(transport, 1).reads == 5
        assert fleet.served(transport, 2).reads == 1
        assert fleet.served(transport, 1).exceptions == 1
        assert fleet.served(transport).reads == 7

    run(with_client(tmp_path, transport, body))


def test_unknown_unit_on_tcp_answers_exception_11(tmp_path: Path) -> None:
    async def body(fleet: SimFleet, client: Client) -> None:
        assert exception_code(await client.read_holding_registers(0, count=1, device_id=9)) == 11
        assert fleet.server("tcp").unknown_unit_requests == 1

    run(with_client(tmp_path, "tcp", body))


@pytest.mark.parametrize("transport", ["rtu", "rtu_tcp"])
def test_unknown_unit_on_an_rtu_bus_is_silent(tmp_path: Path, transport: str) -> None:
    received: list[bytes] = []

    async def body(fleet: SimFleet, client: Client) -> None:
        assert await times_out(client.read_holding_registers(0, count=1, device_id=9)) >= SILENCE * 0.9
        assert received == []  # not a byte came back
        assert fleet.server(transport).unknown_unit_requests == 1
        assert ok(await client.read_holding_registers(0, count=1, device_id=2)) == [42]  # the bus still works

    run(with_client(tmp_path, transport, body, timeout=SILENCE, received=received))


# --- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_response_is_silence_until_cleared(tmp_path: Path, transport: str) -> None:
    received: list[bytes] = []

    async def body(fleet: SimFleet, client: Client) -> None:
        fleet.set_fault(transport, 1, Fault.no_response())
        assert await times_out(client.read_holding_registers(0, count=2, device_id=1)) >= SILENCE * 0.9
        assert received == []
        assert ok(await client.read_holding_registers(0, count=1, device_id=2)) == [42]  # only unit 1 is mute
        fleet.clear_fault(transport, 1)
        assert unpack(">f", ok(await client.read_holding_registers(0, count=2, device_id=1))) == 1.5
        served = fleet.served(transport, 1)
        assert (served.reads, served.unanswered) == (2, 1)

    run(with_client(tmp_path, transport, body, timeout=SILENCE, received=received))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_unit_answers_late(tmp_path: Path, transport: str) -> None:
    async def body(fleet: SimFleet, client: Client) -> None:
        fleet.set_fault(transport, 1, Fault.slow(0.5))
        start = time.monotonic()
        assert unpack(">f", ok(await client.read_holding_registers(0, count=2, device_id=1))) == 1.5
        assert time.monotonic() - start >= 0.5
        fleet.clear_fault(transport)
        ok(await client.read_holding_registers(0, count=2, device_id=1))  # served normally again

    run(with_client(tmp_path, transport, body))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exception_fault_optionally_on_some_addresses(tmp_path: Path, transport: str) -> None:
    async def body(fleet: SimFleet, client: Client) -> None:
        fleet.set_fault(transport, 1, Fault.exception(6))
        assert exception_code(await client.read_holding_registers(0, count=2, device_id=1)) == 6
        assert exception_code(await client.read_coils(0, count=1, device_id=1)) == 6
        fleet.set_fault(transport, 1, Fault.exception(4, addresses=range(14, 15)))
        assert exception_code(await client.read_holding_registers(13, count=2, device_id=1)) == 4
        assert ok(await client.read_holding_registers(0, count=2, device_id=1))  # outside the range
        fleet.clear_fault(transport, 1)
        assert ok(await client.read_holding_registers(13, count=2, device_id=1))
        assert fleet.served(transport, 1).exceptions == 3

    run(with_client(tmp_path, transport, body))


@pytest.mark.parametrize("transport", ["rtu", "rtu_tcp"])
def test_bad_crc_reply_is_no_valid_frame(tmp_path: Path, transport: str) -> None:
    received: list[bytes] = []

    async def body(fleet: SimFleet, client: Client) -> None:
        fleet.set_fault(transport, 1, Fault.bad_crc())
        await times_out(client.read_holding_registers(0, count=2, device_id=1))
        frame = b"".join(received)
        assert frame[:3] == bytes([1, 3, 4])  # the reply came, whole ...
        assert len(frame) == 9
        assert crc16(frame) != 0  # ... with a CRC that does not check
        fleet.clear_fault(transport, 1)
        assert unpack(">f", ok(await client.read_holding_registers(0, count=2, device_id=1))) == 1.5

    run(with_client(tmp_path, transport, body, timeout=SILENCE, received=received))


def test_faults_a_transport_cannot_have_are_refused(tmp_path: Path) -> None:
    fleet = SimFleet(load_sim_config(write_config(tmp_path)))
    with pytest.raises(ValueError, match="no CRC"):
        fleet.set_fault("tcp", 1, Fault.bad_crc())
    with pytest.raises(ValueError, match="no connection to drop"):
        fleet.set_fault("rtu", 1, Fault.drop_connection())
    with pytest.raises(KeyError, match="no unit 9"):
        fleet.set_fault("tcp", 9, Fault.no_response())
    with pytest.raises(KeyError, match="no server named 'nope'"):
        fleet.set_fault("nope", 1, Fault.no_response())


@pytest.mark.parametrize("transport", ["tcp", "rtu_tcp"])
def test_drop_connection_closes_the_clients_connection(tmp_path: Path, transport: str) -> None:
    connects: list[bool] = []

    async def body(fleet: SimFleet, client: Client) -> None:
        assert connects == [True]
        fleet.set_fault(transport, 1, Fault.drop_connection())
        with pytest.raises(ModbusException):
            await client.read_holding_registers(0, count=2, device_id=1)
        deadline = time.monotonic() + 5
        while False not in connects:  # the client saw the server close the connection
            assert time.monotonic() < deadline, f"no disconnect seen: {connects}"
            await asyncio.sleep(0.01)
        assert fleet.served(transport, 1).unanswered == 1
        fleet.clear_fault(transport, 1)
        # pymodbus reconnects by itself; service is back once a read succeeds.
        while True:
            assert time.monotonic() < deadline, f"no service after the fault was cleared: {connects}"
            try:
                response = await client.read_holding_registers(0, count=2, device_id=1)
            except ModbusException:
                await asyncio.sleep(0.05)
                continue
            assert unpack(">f", ok(response)) == 1.5
            break
        assert connects[-1] is True

    run(with_client(tmp_path, transport, body, connects=connects))


# --- writes and counters ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_writes_keep_their_values_and_are_counted(tmp_path: Path, transport: str) -> None:
    async def body(fleet: SimFleet, client: Client) -> None:
        name = transport
        # float64 in little-endian bytes (HGFEDCBA)
        words = [int.from_bytes(struct.pack("<d", -7.25)[i : i + 2], "big") for i in range(0, 8, 2)]
        assert not (await client.write_registers(7, words, device_id=1)).isError()
        assert fleet.register(name, 1, 7).written == words
        assert fleet.decoded(name, 1, 7) == -7.25
        assert ok(await client.read_holding_registers(7, count=4, device_id=1)) == words

        # One word of a 64-bit value: the others keep their value
        assert not (await client.write_register(6, 0x0A0B, device_id=1)).isError()
        assert fleet.words(name, 1, 3) == [0x0708, 0x0506, 0x0304, 0x0A0B]
        assert fleet.decoded(name, 1, 3) == 0x0A0B030405060708

        # Coils, one and several
        assert not (await client.write_coil(1, True, device_id=1)).isError()
        assert not (await client.write_coils(0, [False, True, False], device_id=1)).isError()
        coils = await client.read_coils(0, count=3, device_id=1)
        assert coils.bits[:3] == [False, True, False]
        assert fleet.decoded(name, 1, 2, table="coil") is False

        # A bool inside a register word
        assert not (await client.write_register(14, 0b100, device_id=1)).isError()
        assert fleet.decoded(name, 1, 14, bit=0) is False
        assert fleet.decoded(name, 1, 14, bit=2) is True

        # Input registers and discrete inputs have no write function; a gap refuses
        assert exception_code(await client.write_register(20, 1, device_id=1)) == 2
        assert exception_code(await client.write_coil(10, True, device_id=1)) == 2

        served = fleet.served(name, 1)
        assert (served.reads, served.writes, served.exceptions) == (2, 7, 2)
        assert fleet.served(name, 2).writes == 0

    run(with_client(tmp_path, transport, body))


# --- the CLI ------------------------------------------------------------------------------------------


def test_cli_serves_rtu_and_tcp_and_prints_the_rtu_port(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once every server is up
        assert line == f"rtu: Modbus RTU on {tmp_path}/ttySIM (units 1,2,3)\n"

        async def read() -> list[int]:
            client = AsyncModbusSerialClient(str(tmp_path / "ttySIM"), framer=FramerType.RTU, timeout=2, retries=0)
            assert await client.connect()
            try:
                return ok(await client.read_holding_registers(0, count=1, device_id=3))
            finally:
                client.close()

        assert run(read()) == [42]
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, stderr
    assert f"transport=rtu serial_port={tmp_path}/ttySIM units=1,2,3" in stderr
    assert not (tmp_path / "ttySIM").exists()  # the symlink goes with the simulator
