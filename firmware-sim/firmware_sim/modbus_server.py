"""Modbus TCP servers backed by signals: the only module that imports pymodbus.

pymodbus' simulator (``SimDevice``/``SimData``) keeps a list of register words per
table and calls an ``action`` coroutine before it answers a request, with that
list to modify in place. We declare each configured register as a block of raw
words and, in the action, overwrite the requested ones with the signals' values at
that instant, so a read never returns a stale value and no background task ticks.

pymodbus' API moves between minor versions; keep every use of it in this file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Final

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimAction, SimData, SimDevice

from . import SimulatorError
from .signals import Clock, LiveRegister, Table

__all__ = ["ModbusSimServer"]

log = logging.getLogger(__name__)

# pymodbus logs at INFO on every start and stop; what operators need we log ourselves.
# Only a default is set: a program that configured the "pymodbus" logger keeps its choice.
if logging.getLogger("pymodbus").level == logging.NOTSET:
    logging.getLogger("pymodbus").setLevel(logging.WARNING)

# Function code -> the table it addresses. Coils and discrete inputs (1, 2, 5, 15)
# are not simulated and answer "illegal address".
_TABLE_OF: Final[dict[int, Table]] = {
    3: "holding",
    6: "holding",
    16: "holding",
    22: "holding",
    23: "holding",
    4: "input",
}
# pymodbus also reads back after a write (to build the echo of function 6, or the
# old value for a mask write); only these are reads a client asked for.
_READ_CODES: Final = frozenset({3, 4, 23})
_ANY_UNIT: Final = 0  # pymodbus routes a unit id with no SimDevice of its own to id 0


class ModbusSimServer:
    """One Modbus TCP listener answering for several unit ids.

    ``devices`` maps a unit id to its registers; ``clock`` gives the seconds since
    the fleet started, which is what the signals are functions of.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        devices: Mapping[int, Sequence[LiveRegister]],
        clock: Clock,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.reads = 0
        self._devices = {unit: list(registers) for unit, registers in devices.items()}
        self._clock = clock
        self._server: ModbusTcpServer | None = None

    async def start(self) -> None:
        """Listen; raise SimulatorError if the address cannot be bound."""
        sim_devices = [self._sim_device(unit, regs) for unit, regs in self._devices.items()]
        sim_devices.append(self._absent_unit())
        # ModbusTcpServer needs a running loop at construction, hence here and not in __init__.
        server = ModbusTcpServer(context=sim_devices, address=(self.host, self.port))
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:  # pymodbus' way of saying that bind() failed
            await server.shutdown()
            raise SimulatorError(
                f"server {self.name!r} cannot listen on {self.host}:{self.port}"
                " (port in use, or not an address of this machine)"
            ) from exc
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()

    # --- building pymodbus devices ---------------------------------------------------

    def _sim_device(self, unit: int, registers: Sequence[LiveRegister]) -> SimDevice:
        t = self._clock()
        tables: dict[Table, list[SimData]] = {"holding": [], "input": []}
        for reg in registers:
            tables[reg.table].append(
                SimData(
                    address=reg.address,
                    values=reg.words(t),
                    datatype=DataType.REGISTERS,  # raw words: we encode, pymodbus only stores
                    readonly=reg.table == "input",
                )
            )
        # The 4-block form keeps holding and input registers apart.
        return SimDevice(
            id=unit,
            simdata=(
                [_bits_placeholder()],
                [_bits_placeholder()],
                tables["holding"] or [_invalid_placeholder()],
                tables["input"] or [_invalid_placeholder()],
            ),
            action=self._action(unit, registers),
        )

    def _absent_unit(self) -> SimDevice:
        """Answer a unit id nobody configured with "gateway target failed to respond".

        That is what a Modbus TCP gateway says for a device that is missing behind
        it; without this device pymodbus fails with a KeyError and a logged traceback.
        The blocks span every address so the action runs whatever is asked (about
        2 MB and 10 ms per server, built once at start).
        """

        async def absent(*_: object) -> ExcCodes:
            return ExcCodes.GATEWAY_NO_RESPONSE

        everything = 0x10000
        return SimDevice(
            id=_ANY_UNIT,
            simdata=(
                [_bits_placeholder()],
                [_bits_placeholder()],
                [SimData(address=0, count=everything, datatype=DataType.REGISTERS)],
                [SimData(address=0, count=everything, datatype=DataType.REGISTERS)],
            ),
            action=absent,
        )

    def _action(self, unit: int, registers: Sequence[LiveRegister]) -> SimAction:
        by_table: dict[Table, list[LiveRegister]] = {"holding": [], "input": []}
        for reg in registers:
            by_table[reg.table].append(reg)

        async def on_request(  # noqa: PLR0917 (pymodbus calls it positionally)
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            current: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            table = _TABLE_OF.get(function_code)
            if table is None:
                return ExcCodes.ILLEGAL_ADDRESS
            last = address + count - 1
            touched = [reg for reg in by_table[table] if reg.address <= last and address <= reg.end]
            # Refresh whole values, even when the request covers half of a 32-bit one,
            # so its two words always belong to the same instant.
            t = self._clock()
            for reg in touched:
                offset = reg.address - start_address
                current[offset : offset + reg.width] = reg.words(t)
            if set_values is None:
                if function_code in _READ_CODES:
                    self.reads += 1
                return None
            written = dict(enumerate((int(v) for v in set_values), start=address))
            for reg in touched:
                offset = reg.address - start_address
                self._pin(unit, reg, current[offset : offset + reg.width], written)
            return None

        return on_request

    def _pin(self, unit: int, reg: LiveRegister, words: list[int], written: dict[int, int]) -> None:
        """Freeze a register at what a client wrote.

        ``words`` are its words now, ``written`` maps address -> written word; a word of
        a 32-bit value the client did not write keeps its value of this instant.
        """
        for i in range(reg.width):
            words[i] = written.get(reg.address + i, words[i])
        reg.written = words
        log.info(
            "register written",
            extra={
                "server": self.name,
                "unit": unit,
                "address": reg.address,
                "register": reg.name or "-",
                "raw": ",".join(map(str, words)),
            },
        )


# pymodbus wants at least one entry in each of the four blocks.


def _invalid_placeholder() -> SimData:
    # An empty register table: an INVALID entry answers "illegal address".
    return SimData(address=0, datatype=DataType.INVALID)


def _bits_placeholder() -> SimData:
    # Coils and discrete inputs must be BITS blocks; the action refuses them anyway.
    return SimData(address=0, datatype=DataType.BITS)
