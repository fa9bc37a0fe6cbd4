"""The only module of the gateway that imports pymodbus.

pymodbus renames and deprecates APIs between minor releases (we pin ``~=3.16``);
keeping it behind this adapter means an upgrade touches one file. Its return codes
and exceptions become our own small hierarchy here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

__all__ = ["BusUnavailable", "DeviceException", "DeviceTimeout", "ModbusError", "ModbusTcpClient"]

# pymodbus logs every failed request at ERROR, with frame dumps; we report the same
# events once, as device state with a reason.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

Table = Literal["holding", "input"]


class ModbusError(Exception):
    """Base of the errors a Modbus read can end with."""


class BusUnavailable(ModbusError):
    """The connection to the bus (gateway, PLC) is down or could not be made."""


class DeviceTimeout(ModbusError):
    """The bus is up but the unit did not answer in time."""


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

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"exception {code} ({self.NAMES.get(code, 'unknown')})")


class ModbusTcpClient:
    """One Modbus TCP connection; requests on it run one at a time."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        # retries=0 and reconnect_delay=0: retry and reconnect policy is the source's job.
        self._client = AsyncModbusTcpClient(host, port=port, timeout=timeout, retries=0, reconnect_delay=0)
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    async def connect(self) -> None:
        if await self._client.connect():
            return
        raise BusUnavailable(await self._why_unreachable())

    async def _why_unreachable(self) -> str:
        # pymodbus only says "False"; one plain connect attempt tells the operator why.
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            return f"cannot connect to {where}: no answer within {self.timeout:g}s"
        except OSError as exc:
            return f"cannot connect to {where}: {exc.strerror or exc}"
        writer.close()
        return f"cannot connect to {where}"

    async def read(self, table: Table, unit: int, address: int, count: int) -> list[int]:
        async with self._lock:
            if not self.connected:
                await self.connect()
            try:
                if table == "holding":
                    response = await self._client.read_holding_registers(address, count=count, device_id=unit)
                else:
                    response = await self._client.read_input_registers(address, count=count, device_id=unit)
            except ModbusIOException:
                if not self.connected:
                    raise BusUnavailable(f"connection to {self.host}:{self.port} lost") from None
                raise DeviceTimeout(f"unit {unit} did not answer within {self.timeout:g}s") from None
            except ConnectionException:
                raise BusUnavailable(f"connection to {self.host}:{self.port} lost") from None
            except ModbusException as exc:
                raise ModbusError(str(exc)) from None
        if response.isError():
            raise DeviceException(int(getattr(response, "exception_code", 0)))
        registers = list(response.registers)
        if len(registers) < count:
            raise ModbusError(f"short answer: asked for {count} registers, got {len(registers)}")
        return registers[:count]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()
