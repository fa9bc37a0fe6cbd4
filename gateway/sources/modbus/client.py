"""The only module of the gateway that imports pymodbus.

pymodbus renames and deprecates APIs between minor releases (we pin ``~=3.16``);
keeping it behind this adapter means an upgrade touches one file. Its return codes
and exceptions become our own small hierarchy here.

A :class:`ModbusBus` is one serialized channel: a TCP connection, or a serial port
(RS-485 is half duplex). Requests on it never overlap and are separated by the
configured inter-frame delay; retry, backoff and device state are the source's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

__all__ = [
    "BusSpec",
    "BusUnavailable",
    "DeviceException",
    "DeviceTimeout",
    "ModbusBus",
    "ModbusError",
    "Transport",
]

# pymodbus logs every failed request at ERROR, with frame dumps; we report the same
# events once, as device state with a reason.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

# pymodbus drops a TCP connection after retries+3 unanswered requests in a row. On a
# bus shared by several units that would take healthy devices down with a dead one;
# whether the connection is dead is decided here, by connection errors only.
_NEVER_DISCONNECT = 10**9
LATE_REPLY_GUARD_MAX = 1.0  # seconds an RTU bus stays quiet after a timeout (the timeout, at most this)


class ModbusError(Exception):
    """Base of the errors a Modbus request can end with."""


class BusUnavailable(ModbusError):
    """The connection to the bus (TCP peer, serial port) is down or could not be made."""


class DeviceTimeout(ModbusError):
    """The bus is up but the unit did not answer (in time, or with a valid frame)."""


class DeviceException(ModbusError):
    """The unit answered with a Modbus exception response."""

    NAMES = {
        1: "illegal function",
        2: "illegal data address",
        3: "illegal data value",
        4: "device failure",
        5: "acknowledge",
        6: "device busy",
        10: "gateway path unavailable",
        11: "gateway target failed to respond",
    }
    NO_ANSWER_CODES = frozenset({10, 11})

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"exception {code} ({self.NAMES.get(code, 'unknown')})")


Transport = str  # "tcp" | "rtu" | "rtu_tcp"


@dataclass(frozen=True)
class BusSpec:
    """Where a bus is and how to talk on it."""

    transport: Transport
    host: str = ""
    port: int = 0
    serial_port: str = ""
    baudrate: int = 19200
    parity: str = "E"
    stopbits: int = 1
    bytesize: int = 8
    timeout: float = 1.0
    inter_frame_delay: float = 0.0

    @property
    def where(self) -> str:
        return self.serial_port if self.transport == "rtu" else f"{self.host}:{self.port}"


class ModbusBus:
    """One Modbus channel; every request on it runs alone, then the line rests ``inter_frame_delay``."""

    def __init__(self, spec: BusSpec) -> None:
        self.spec = spec
        self.crc_errors = 0  # frames that failed their CRC check (RTU)
        self.last_latency = 0.0  # seconds the last request took on the wire (not waiting for the bus)
        self.last_crc_errors = 0  # CRC errors seen during the last request
        self._client = self._make_client(spec)
        self._lock = asyncio.Lock()
        self._quiet_until = 0.0
        client = self._client
        self._calls = {
            "coil": client.read_coils,
            "discrete_input": client.read_discrete_inputs,
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "write_register": client.write_register,
            "write_registers": client.write_registers,
            "write_coil": client.write_coil,
        }
        self._count_crc_errors()

    @staticmethod
    def _make_client(spec: BusSpec) -> Any:
        # retries=0 and reconnect_delay=0: retry and reconnect policy is the source's job.
        if spec.transport == "rtu":
            return AsyncModbusSerialClient(
                spec.serial_port,
                framer=FramerType.RTU,
                baudrate=spec.baudrate,
                parity=spec.parity,
                stopbits=spec.stopbits,
                bytesize=spec.bytesize,
                timeout=spec.timeout,
                retries=0,
                reconnect_delay=0,
            )
        framer = FramerType.RTU if spec.transport == "rtu_tcp" else FramerType.SOCKET
        return AsyncModbusTcpClient(
            spec.host, port=spec.port, framer=framer, timeout=spec.timeout, retries=0, reconnect_delay=0
        )

    def _count_crc_errors(self) -> None:
        # pymodbus' RTU framer discards a frame with a bad CRC silently (the request then
        # times out). Its decode() says so by consuming the bytes without returning a
        # frame; wrapping it on this client's framer is the one way to count them.
        framer = self._client.ctx.framer
        if self.spec.transport == "tcp":
            return
        decode = framer.decode

        def counting_decode(data: bytes) -> tuple[int, int, int, bytes]:
            used, dev_id, tid, frame = decode(data)
            if used and not frame:
                self.crc_errors += 1
            return used, dev_id, tid, frame

        framer.decode = counting_decode

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    async def connect(self) -> None:
        ctx = self._client.ctx
        ctx.max_until_disconnect = ctx.count_until_disconnect = _NEVER_DISCONNECT
        if await self._client.connect():
            ctx.count_until_disconnect = _NEVER_DISCONNECT
            return
        raise BusUnavailable(await self._why_unreachable())

    async def _why_unreachable(self) -> str:
        # pymodbus only says "False"; one plain attempt tells the operator why.
        spec = self.spec
        if spec.transport == "rtu":
            try:
                import serial  # noqa: PLC0415 (pyserial comes with pymodbus' serial client)

                serial.Serial(spec.serial_port).close()
            except Exception as exc:  # SerialException wraps the OSError text
                return f"cannot open {spec.serial_port}: {exc}"
            return f"cannot open {spec.serial_port}"
        try:
            async with asyncio.timeout(spec.timeout):
                _, writer = await asyncio.open_connection(spec.host, spec.port)
        except TimeoutError:
            return f"cannot connect to {spec.where}: no answer within {spec.timeout:g}s"
        except OSError as exc:
            return f"cannot connect to {spec.where}: {exc.strerror or exc}"
        writer.close()
        return f"cannot connect to {spec.where}"

    async def read(self, table: str, unit: int, address: int, count: int, timeout: float) -> list[int]:
        """Registers (0..65535) or bits (0/1) of one table; raises a ModbusError."""
        response = await self._request(table, unit, timeout, address=address, count=count)
        if table in ("coil", "discrete_input"):
            values = [int(b) for b in response.bits]
            fits = count <= len(values) < count + 8  # bits come in whole bytes
        else:
            values = list(response.registers)
            fits = len(values) == count
        if not fits:
            # An answer of another size belongs to another request (a late reply): never data,
            # and this request's own answer may still be on its way.
            async with self._lock:
                await self._let_late_reply_pass(timeout)
            raise DeviceTimeout(f"unit {unit}: answer of {len(values)} values to a request for {count}")
        return values[:count]

    async def write_registers(self, unit: int, address: int, words: Sequence[int], timeout: float) -> None:
        """Function 6 for one register, 16 for several."""
        if len(words) == 1:
            await self._request("write_register", unit, timeout, address=address, value=words[0])
        else:
            await self._request("write_registers", unit, timeout, address=address, values=list(words))

    async def write_coil(self, unit: int, address: int, value: bool, timeout: float) -> None:
        await self._request("write_coil", unit, timeout, address=address, value=value)

    async def _request(self, what: str, unit: int, timeout: float, **args: Any) -> Any:
        client = self._client
        call = self._calls[what]
        async with self._lock:
            if not self.connected:
                await self.connect()
            delay = self._quiet_until - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # The request timeout is per device; pymodbus reads it from here on every request.
            client.ctx.comm_params.timeout_connect = timeout
            crc_before = self.crc_errors
            started = time.monotonic()
            try:
                response = await call(device_id=unit, **args)
            except ModbusIOException:
                if not self.connected:
                    raise BusUnavailable(f"connection to {self.spec.where} lost") from None
                await self._let_late_reply_pass(timeout)
                raise DeviceTimeout(f"unit {unit} did not answer within {timeout:g}s") from None
            except ConnectionException:
                raise BusUnavailable(f"connection to {self.spec.where} lost") from None
            except ModbusException as exc:
                raise ModbusError(str(exc)) from None
            finally:
                now = time.monotonic()
                self.last_latency = now - started
                self.last_crc_errors = self.crc_errors - crc_before
                self._quiet_until = now + self.spec.inter_frame_delay
                client.ctx.comm_params.timeout_connect = self.spec.timeout  # connects use the bus's own
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            if code in DeviceException.NO_ANSWER_CODES:
                # A Modbus TCP gateway answering for a unit behind it that did not answer:
                # for us the unit is as silent as on its own bus.
                raise DeviceTimeout(f"unit {unit} did not answer (the Modbus gateway says: {DeviceException(code)})")
            raise DeviceException(code)
        return response

    async def _let_late_reply_pass(self, timeout: float) -> None:
        """After a timeout on RTU, keep the line quiet a while so a late reply is dropped.

        An RTU frame carries no transaction id and a read answer no address: a reply
        that arrives after the next request went out would be taken as that request's
        answer, wrong data with good quality (or, in a bit write's read-modify-write,
        another register's word written back). pymodbus drops frames that arrive while
        no request waits, so waiting here, with the bus held, is what discards it.
        """
        if self.spec.transport != "tcp":  # Modbus TCP matches answers by transaction id
            await asyncio.sleep(min(timeout, LATE_REPLY_GUARD_MAX))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()
