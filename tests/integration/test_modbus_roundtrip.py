"""Every type x byte order, written and read back by the gateway through a real pymodbus server.

The server is pymodbus' own (not our simulator), so the gateway's encoding meets an
independent Modbus implementation on the wire. Writes go through the same path as a
command (``ModbusSource.write``), reads through the same path as a poll.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from gateway.sources.base import CommandError
from gateway.sources.modbus.codec import ByteOrder, RegisterType
from gateway.sources.modbus.config import ModbusTcpConfig
from gateway.sources.modbus.source import ModbusSource
from tests.rig import free_port

T = TypeVar("T")

NUMERIC = [k for k in RegisterType if k.is_numeric]
STRING_LENGTH = 5  # registers: 10 characters

# One writable tag per type x byte order, each at its own address; plus bits and a coil.
TAGS: list[dict[str, Any]] = []
_address = 0
for _kind in [*NUMERIC, RegisterType.STRING]:
    for _order in ByteOrder:
        tag = {"name": f"{_kind.value}_{_order.value}", "address": _address, "type": _kind.value}
        tag |= {"byte_order": _order.value, "writable": True}
        if _kind is RegisterType.STRING:
            tag["length"] = STRING_LENGTH
        TAGS.append(tag)
        _address += STRING_LENGTH if _kind is RegisterType.STRING else _kind.width
BIT_REGISTER = _address
TAGS += [{"name": f"bit{b}", "address": BIT_REGISTER, "type": "bool", "bit": b, "writable": True} for b in (0, 7, 15)]
TAGS.append({"name": "coil", "table": "coil", "address": 3, "writable": True})
REGISTERS = BIT_REGISTER + 1


class Rig:
    """A pymodbus server and a ModbusSource on one event loop in a thread; tests submit coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = free_port()
        self.source: ModbusSource | None = None
        self.server: ModbusTcpServer | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        registers = [SimData(address=0, count=REGISTERS, values=0, datatype=DataType.REGISTERS)]
        bits = [SimData(address=0, count=16, datatype=DataType.BITS)]
        device = SimDevice(id=1, simdata=(bits, bits, registers, registers))
        self.server = ModbusTcpServer(context=[device], address=("127.0.0.1", self.port))
        await self.server.serve_forever(background=True)
        config = ModbusTcpConfig.model_validate(
            {
                "kind": "modbus_tcp",
                "name": "roundtrip",
                "host": "127.0.0.1",
                "port": self.port,
                "devices": [{"name": "dev", "unit": 1, "registers": TAGS}],
            }
        )
        self.source = ModbusSource(config)

    async def _stop(self) -> None:
        if self.source is not None:
            self.source.bus.close()
        if self.server is not None:
            await self.server.shutdown()

    def __enter__(self) -> Rig:
        self.thread.start()
        self.run(self._start())
        return self

    def __exit__(self, *_: object) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def write(self, tag: str, value: object) -> None:
        assert self.source is not None
        self.run(self.source.write("dev", tag, value))

    def read_all(self) -> dict[str, Any]:
        assert self.source is not None
        poller = self.source.pollers["dev"]
        values = self.run(poller.poll(poller.groups, attempts=1))
        return {name: v.value for name, v in values.items()}


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with Rig() as running:
        yield running


def _values(kind: RegisterType) -> st.SearchStrategy[Any]:
    if kind is RegisterType.FLOAT32:
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    if kind is RegisterType.FLOAT64:
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind is RegisterType.STRING:
        alphabet = st.characters(min_codepoint=0x21, max_codepoint=0xFF)
        return st.text(alphabet, max_size=2 * STRING_LENGTH)
    bits = {1: 16, 2: 32, 4: 64}[kind.width]
    if kind.value.startswith("u"):
        return st.integers(0, 2**bits - 1)
    return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("kind", [*NUMERIC, RegisterType.STRING], ids=lambda k: k.value)
def test_every_type_and_byte_order_round_trips(rig: Rig, kind: RegisterType) -> None:
    @settings(max_examples=25, deadline=None, database=None)
    @given(values=st.tuples(*(_values(kind) for _ in ByteOrder)))
    def check(values: tuple[Any, ...]) -> None:
        for order, value in zip(ByteOrder, values, strict=True):
            rig.write(f"{kind.value}_{order.value}", value)
        back = rig.read_all()
        for order, value in zip(ByteOrder, values, strict=True):
            got = back[f"{kind.value}_{order.value}"]
            if kind is RegisterType.FLOAT32:
                # Read as the shortest decimal with the same 32 bits (231.7, not 231.6999969482422).
                assert struct.pack(">f", got) == struct.pack(">f", value) or got == value == 0, (order, got, value)
            else:
                assert got == value, (order, got, value)  # exact, float64 included (-0.0 reads as 0.0)

    check()


def test_the_byte_orders_really_differ_on_the_wire(rig: Rig) -> None:
    """Read the raw registers back with another type's view: the four orders are four layouts."""
    for order in ByteOrder:
        rig.write(f"uint32_{order.value}", 0x01020304)
    assert rig.source is not None
    poller = rig.source.pollers["dev"]
    address = next(t["address"] for t in TAGS if t["name"] == "uint32_ABCD")
    words = rig.run(rig.source.bus.read("holding", 1, address, 8, timeout=2))
    assert words == [0x0102, 0x0304, 0x0304, 0x0102, 0x0201, 0x0403, 0x0403, 0x0201]
    assert poller.stats.writes >= 4


def test_bits_of_a_register_and_coils(rig: Rig) -> None:
    rig.write("bit0", True)
    rig.write("bit15", True)
    rig.write("bit7", False)
    values = rig.read_all()
    assert (values["bit0"], values["bit7"], values["bit15"]) == (True, False, True)
    words = rig.run(rig.source.bus.read("holding", 1, BIT_REGISTER, 1, timeout=2))  # type: ignore[union-attr]
    assert words == [0x8001]
    rig.write("bit0", False)
    assert rig.read_all()["bit0"] is False
    for state in (True, False, True):
        rig.write("coil", state)
        assert rig.read_all()["coil"] is state


@pytest.mark.parametrize(
    ("tag", "value", "reason"),
    [
        ("int16_ABCD", 40000, "outside the range of int16"),
        ("uint64_ABCD", -1, "outside the range of uint64"),
        ("float32_ABCD", 1e300, "does not fit float32"),
        ("string_ABCD", "x" * 11, "5 registers hold at most 10"),
        ("coil", 2, "expected true or false"),
        ("nope", 1, "has no tag 'nope'"),
    ],
)
def test_values_that_do_not_fit_are_refused_before_the_wire(rig: Rig, tag: str, value: object, reason: str) -> None:
    assert rig.source is not None
    before = rig.source.pollers["dev"].stats.requests
    with pytest.raises(CommandError, match=reason):
        rig.write(tag, value)
    assert rig.source.pollers["dev"].stats.requests == before
