"""All configured servers as one object: what tests, the demo and the CLI start.

::

    async with SimFleet(load_sim_config("configs/sim.toml")) as fleet:
        ...  # every server is listening (every RTU port exists) here
        fleet.value("line1", unit=1, address=0)  # what a read would return now, before encoding
        fleet.set_fault("line1", 1, Fault.no_response())
        fleet.served("line1", 1).reads  # read requests unit 1 received
        fleet.clear_fault("line1", 1)
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from . import SimulatorError
from .codec import Value
from .config import SimConfig
from .faults import Fault
from .modbus_server import ModbusSimServer, Served
from .serial_sensor import SerialSensor
from .signals import LiveRegister, Table

__all__ = ["Fault", "Served", "SimFleet", "SimulatorError"]

log = logging.getLogger(__name__)


class SimFleet:
    """Starts and stops every server of a config; signals count time from ``start()``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._started_at = time.monotonic()
        self._registers: dict[tuple[str, int, Table, int, int | None], LiveRegister] = {}
        self._servers: dict[str, ModbusSimServer] = {}
        self._running: list[ModbusSimServer] = []
        self._sensors = {
            sensor.name: SerialSensor(sensor, config.serial_dir or Path("."), clock=self.elapsed)
            for sensor in config.serial_sensors
        }
        self._sensors_running: list[SerialSensor] = []
        for server in config.expand():
            devices: dict[int, list[LiveRegister]] = {}
            for unit, device in server.devices.items():
                devices[unit] = []
                for reg in device.registers:
                    live = LiveRegister(
                        address=reg.address,
                        table=reg.table,
                        type=reg.type,
                        scale=reg.scale,
                        signal=reg.signal.build(self._rng(server.name, unit, reg.table, reg.address, reg.bit)),
                        name=reg.name,
                        byte_order=reg.order,
                        length=reg.length,
                        bit=reg.bit,
                    )
                    devices[unit].append(live)
                    self._registers[(server.name, unit, reg.table, reg.address, reg.bit)] = live
            self._servers[server.name] = ModbusSimServer(
                server.name,
                server.host,
                server.port,
                devices,
                clock=self.elapsed,
                transport=server.transport,
                serial_port=server.serial_port,
            )

    def _rng(self, server: str, unit: int, table: str, address: int, bit: int | None) -> random.Random:
        # One generator per register, seeded from its identity: each random sequence is
        # reproducible whatever order clients read the registers in.
        if self.config.seed is None:
            return random.Random()
        where = f"{address}" if bit is None else f"{address}.{bit}"
        return random.Random(f"{self.config.seed}/{server}/{unit}/{table}/{where}")

    def elapsed(self) -> float:
        """Seconds since the fleet started: the time every signal is a function of."""
        return time.monotonic() - self._started_at

    @property
    def servers(self) -> list[ModbusSimServer]:
        """Every server after ``count`` expansion, in config order."""
        return list(self._servers.values())

    @property
    def sensors(self) -> list[SerialSensor]:
        return list(self._sensors.values())

    def sensor(self, name: str) -> SerialSensor:
        """A serial sensor by name: its ``path``, ``faults`` (garbage, partial, ...), ``unplug()``/``plug()``."""
        try:
            return self._sensors[name]
        except KeyError:
            raise KeyError(f"no serial sensor named {name!r}") from None

    def server(self, name: str) -> ModbusSimServer:
        try:
            return self._servers[name]
        except KeyError:
            raise KeyError(f"no server named {name!r}") from None

    async def start(self) -> None:
        """Start every server; all are listening when this returns.

        Raises SimulatorError (after stopping those already started) if one cannot listen.
        """
        self._started_at = time.monotonic()
        for server in self._servers.values():
            try:
                await server.start()
            except BaseException:
                await self.stop()
                raise
            self._running.append(server)
            where = (
                {"serial_port": server.serial_port}
                if server.serial_port is not None
                else {"host": server.host, "port": server.port}
            )
            log.info(
                "modbus server listening",
                extra={
                    "server": server.name,
                    **({"transport": server.transport} if server.transport != "tcp" else {}),
                    **where,
                    "units": ",".join(map(str, server.units)),
                },
            )
        for sensor in self._sensors.values():
            try:
                sensor.path.parent.mkdir(parents=True, exist_ok=True)
                await sensor.start()
            except OSError as exc:
                await self.stop()
                raise SimulatorError(
                    f"serial sensor {sensor.config.name!r} cannot start at {sensor.path}: {exc}"
                ) from exc
            self._sensors_running.append(sensor)
            log.info("serial sensor writing", extra={"sensor": sensor.config.name, "port": str(sensor.path)})

    async def stop(self) -> None:
        while self._sensors_running:
            await self._sensors_running.pop().stop()
        while self._running:
            server = self._running.pop()
            await server.stop()
            log.info("modbus server stopped", extra={"server": server.name, "reads": server.reads})

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- faults and counters ---------------------------------------------------------------

    def set_fault(self, server: str, unit: int, fault: Fault) -> None:
        """Make ``unit`` of ``server`` misbehave from its next request on (see ``faults``)."""
        self.server(server).set_fault(unit, fault)

    def clear_fault(self, server: str, unit: int | None = None) -> None:
        """Serve ``unit`` (None: every unit of ``server``) normally again."""
        self.server(server).clear_fault(unit)

    def served(self, server: str, unit: int | None = None) -> Served:
        """Requests received by ``unit`` (None: all units of ``server``): reads, writes, ..."""
        return self.server(server).served(unit)

    @property
    def reads(self) -> int:
        """Read requests answered with data so far, over all servers (exceptions not counted)."""
        return sum(server.reads for server in self._servers.values())

    # --- registers ---------------------------------------------------------------------------

    def value(self, server: str, unit: int, address: int, table: Table = "holding", bit: int | None = None) -> Value:
        """The signal's value now, before scaling and encoding.

        ``address`` is the register's configured (first) address. A register a client
        wrote still reports its signal here; see ``decoded()`` and ``register().written``.
        A random signal draws a fresh sample, as a read would.
        """
        return self.register(server, unit, address, table, bit).signal(self.elapsed())

    def words(
        self, server: str, unit: int, address: int, table: Table = "holding", bit: int | None = None
    ) -> list[int]:
        """The raw words a read returns now (the written ones, once a client wrote)."""
        return self.register(server, unit, address, table, bit).words(self.elapsed())

    def decoded(self, server: str, unit: int, address: int, table: Table = "holding", bit: int | None = None) -> Value:
        """The value a correct client decodes now: the written one, once a client wrote."""
        return self.register(server, unit, address, table, bit).decoded(self.elapsed())

    def register(
        self, server: str, unit: int, address: int, table: Table = "holding", bit: int | None = None
    ) -> LiveRegister:
        try:
            return self._registers[(server, unit, table, address, bit)]
        except KeyError:
            what = f"{table} register at {address}" + ("" if bit is None else f" bit {bit}")
            raise KeyError(f"no {what} on unit {unit} of server {server!r}") from None
