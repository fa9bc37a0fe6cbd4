"""Modbus servers backed by signals: TCP, RTU on a pty, and RTU framing over TCP.

The bytes are ours (``protocol``: requests answered from live registers, RTU
framing and CRC); this module moves them and applies faults. No pymodbus here:
a fault must control exactly what leaves the server (nothing at all, a corrupt
CRC, a closed connection), which pymodbus' server does not offer, and the
simulator, being the oracle for a pymodbus client, should not share its code.

* ``tcp``: MBAP framing; a unit id nobody configured answers exception 11
  ("gateway target failed to respond"), as a TCP gateway with a missing device does.
* ``rtu``: one RS-485 bus on a pty (``pty_port``); units answer in turn (a slow
  unit holds the bus) and an unknown unit id gets silence, as on a real bus.
* ``rtu_tcp``: RTU frames over a TCP connection, like a serial device server;
  each connection is its own bus; unknown units are silent.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

from . import SimulatorError
from .faults import Fault, FaultKind
from .memory import UnitMemory
from .protocol import (
    GATEWAY_NO_RESPONSE,
    READ_FUNCTIONS,
    WRITE_FUNCTIONS,
    RtuParser,
    answer,
    exception_pdu,
    request_spans,
    rtu_frame,
)
from .pty_port import PtyPort
from .signals import Clock, LiveRegister

__all__ = ["ModbusSimServer", "Served", "Transport"]

log = logging.getLogger(__name__)

Transport = Literal["tcp", "rtu", "rtu_tcp"]

_MBAP: Final = struct.Struct(">HHHB")  # transaction, protocol, length (unit + PDU), unit
# Stands for the 3.5-character silence that ends an RTU frame: a pty has no baud
# rate, so a partial frame this old is noise, dropped before the next request.
RTU_IDLE_GAP: Final = 0.05


@dataclass
class Served:
    """Requests a unit (or a whole server) received, as on the wire.

    ``reads`` counts functions 1, 2, 3, 4 and 23, ``writes`` 5, 6, 15, 16, 22 and 23
    (a 23 is both), whatever the outcome; ``exceptions`` those answered with an
    exception (a fault's included); ``unanswered`` those a fault swallowed
    (no_response, drop_connection).
    """

    reads: int = 0
    writes: int = 0
    exceptions: int = 0
    unanswered: int = 0

    def __add__(self, other: Served) -> Served:
        return Served(
            self.reads + other.reads,
            self.writes + other.writes,
            self.exceptions + other.exceptions,
            self.unanswered + other.unanswered,
        )


@dataclass(frozen=True)
class _Outcome:
    pdu: bytes | None  # None: say nothing
    drop: bool = False  # close the connection instead
    corrupt_crc: bool = False


_SILENCE: Final = _Outcome(None)


class ModbusSimServer:
    """One endpoint (TCP listener or RTU bus) answering for several unit ids.

    ``devices`` maps a unit id to its registers; ``clock`` gives the seconds since
    the fleet started, which is what the signals are functions of.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int | None,
        devices: Mapping[int, Sequence[LiveRegister]],
        clock: Clock,
        *,
        transport: Transport = "tcp",
        serial_port: str | None = None,
    ) -> None:
        if (transport == "rtu") != (serial_port is not None):
            raise ValueError("an rtu server needs a serial_port, and only an rtu server has one")
        self.name = name
        self.host = host
        self.port = port
        self.transport = transport
        self.serial_port = serial_port
        self.reads = 0  # read requests answered with data (not exceptions); kept for older tests
        self.unknown_unit_requests = 0
        self._units = {unit: UnitMemory(registers) for unit, registers in devices.items()}
        self._served = {unit: Served() for unit in devices}
        self._faults: dict[int, Fault] = {}
        self._clock = clock
        self._listener: asyncio.Server | None = None
        self._pty: PtyPort | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def units(self) -> list[int]:
        return list(self._units)

    @property
    def endpoint(self) -> str:
        """Where clients find it: ``host:port``, or the serial port's path."""
        return self.serial_port if self.serial_port is not None else f"{self.host}:{self.port}"

    # --- counters and faults -------------------------------------------------------------

    def served(self, unit: int | None = None) -> Served:
        """A copy of the counters of ``unit``, or of all configured units together."""
        if unit is None:
            return sum(self._served.values(), Served())
        return replace(self._served[self._known(unit)])

    def set_fault(self, unit: int, fault: Fault) -> None:
        """From now on ``unit`` misbehaves as ``fault`` says (replacing any earlier fault)."""
        self._known(unit)
        if fault.kind is FaultKind.BAD_CRC and self.transport == "tcp":
            raise ValueError(f"server {self.name!r} speaks Modbus TCP, which has no CRC to corrupt")
        if fault.kind is FaultKind.DROP_CONNECTION and self.transport == "rtu":
            raise ValueError(f"server {self.name!r} is a serial bus: no connection to drop (use no_response)")
        self._faults[unit] = fault

    def clear_fault(self, unit: int | None = None) -> None:
        """Serve ``unit`` (or every unit) normally again."""
        if unit is None:
            self._faults.clear()
        else:
            self._faults.pop(self._known(unit), None)

    def _known(self, unit: int) -> int:
        if unit not in self._units:
            raise KeyError(f"server {self.name!r} has no unit {unit}")
        return unit

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (or open the pty); raise SimulatorError if that is impossible."""
        if self.serial_port is not None:
            self._pty = PtyPort(self.serial_port)
            try:
                self._pty.open()
            except OSError as exc:
                raise SimulatorError(f"server {self.name!r} cannot create {self.serial_port}: {exc}") from exc
            self._spawn(self._serve_rtu(self._pty.read, self._pty.write))
            return
        handler = self._on_tcp_client if self.transport == "tcp" else self._on_rtu_tcp_client
        try:
            self._listener = await asyncio.start_server(handler, self.host, self.port)
        except OSError as exc:
            raise SimulatorError(
                f"server {self.name!r} cannot listen on {self.host}:{self.port}"
                " (port in use, or not an address of this machine)"
            ) from exc

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await listener.wait_closed()
        if self._pty is not None:
            pty, self._pty = self._pty, None
            pty.close()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- transports ----------------------------------------------------------------------

    async def _connection(self, writer: asyncio.StreamWriter, serve: Awaitable[None]) -> None:
        """Run one client connection so that stop() can end it; close it however it ends."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await serve
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        except asyncio.CancelledError:
            # stop() cancels us. Returning ends this task all the same; raising would make
            # asyncio's stream callback log a traceback for a cancelled connection (3.11).
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _on_tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._connection(writer, self._serve_tcp(reader, writer))

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            transaction, protocol, length, unit = _MBAP.unpack(await reader.readexactly(_MBAP.size))
            if not 2 <= length <= 254:
                return  # not Modbus TCP: hang up, as devices do
            pdu = await reader.readexactly(length - 1)
            outcome = await self._handle(unit, pdu, silent_unknown=False)
            if outcome.drop:
                return
            if outcome.pdu is not None:
                writer.write(_MBAP.pack(transaction, protocol, len(outcome.pdu) + 1, unit) + outcome.pdu)
                await writer.drain()

    async def _on_rtu_tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._connection(writer, self._serve_rtu(lambda: reader.read(4096), writer.write))

    async def _serve_rtu(self, read: Callable[[], Awaitable[bytes]], write: Callable[[bytes], None]) -> None:
        """Answer RTU requests one at a time, as a half-duplex bus does; return on EOF or drop."""
        parser = RtuParser()
        while True:
            if parser.pending:
                try:
                    async with asyncio.timeout(RTU_IDLE_GAP):
                        data = await read()
                except TimeoutError:
                    parser.reset()  # a gap ends any frame: what we hold is noise
                    continue
            else:
                data = await read()
            if not data:
                return
            for unit, pdu in parser.feed(data):
                outcome = await self._handle(unit, pdu, silent_unknown=True)
                if outcome.drop:
                    return
                if outcome.pdu is not None:
                    write(rtu_frame(unit, outcome.pdu, corrupt_crc=outcome.corrupt_crc))

    # --- one request ---------------------------------------------------------------------

    async def _handle(self, unit: int, pdu: bytes, *, silent_unknown: bool) -> _Outcome:
        memory = self._units.get(unit)
        if memory is None:
            self.unknown_unit_requests += 1
            return _SILENCE if silent_unknown else _Outcome(exception_pdu(pdu[0], GATEWAY_NO_RESPONSE))
        function = pdu[0]
        served = self._served[unit]
        served.reads += function in READ_FUNCTIONS
        served.writes += function in WRITE_FUNCTIONS
        fault = self._faults.get(unit)
        if fault is not None and not fault.hits(request_spans(pdu)):
            fault = None
        if fault is not None:
            if fault.kind in {FaultKind.NO_RESPONSE, FaultKind.DROP_CONNECTION}:
                served.unanswered += 1
                return _Outcome(None, drop=fault.kind is FaultKind.DROP_CONNECTION)
            if fault.kind is FaultKind.EXCEPTION:
                served.exceptions += 1
                return _Outcome(exception_pdu(function, fault.code))
            if fault.kind is FaultKind.SLOW:
                await asyncio.sleep(fault.delay)
        reply = answer(memory, pdu, self._clock())
        if reply.is_exception:
            served.exceptions += 1
        elif function in READ_FUNCTIONS:
            self.reads += 1
        for reg in reply.written:
            self._log_write(unit, reg)
        return _Outcome(reply.pdu, corrupt_crc=fault is not None and fault.kind is FaultKind.BAD_CRC)

    def _log_write(self, unit: int, reg: LiveRegister) -> None:
        log.info(
            "register written",
            extra={
                "server": self.name,
                "unit": unit,
                "table": reg.table,
                "address": reg.address,
                "register": reg.name or "-",
                "raw": ",".join(map(str, reg.written or [])),
            },
        )
