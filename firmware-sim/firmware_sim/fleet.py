"""All configured servers as one object: what tests, the demo and the CLI start.

::

    async with SimFleet(load_sim_config("configs/sim.toml")) as fleet:
        ...  # every server is listening here
        fleet.value("line1", unit=1, address=0)  # what a read would return now, before encoding
"""

from __future__ import annotations

import logging
import random
import time
from types import TracebackType
from typing import Self

from . import SimulatorError
from .config import SimConfig
from .modbus_server import ModbusSimServer
from .signals import LiveRegister, Table

__all__ = ["SimFleet", "SimulatorError"]

log = logging.getLogger(__name__)


class SimFleet:
    """Starts and stops every server of a config; signals count time from ``start()``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._started_at = time.monotonic()
        self._registers: dict[tuple[str, int, Table, int], LiveRegister] = {}
        self._servers: list[ModbusSimServer] = []
        self._running: list[ModbusSimServer] = []
        for server in config.servers:
            devices: dict[int, list[LiveRegister]] = {}
            for device in server.devices:
                devices[device.unit] = []
                for reg in device.registers:
                    live = LiveRegister(
                        address=reg.address,
                        table=reg.table,
                        type=reg.type,
                        scale=reg.scale,
                        signal=reg.signal.build(self._rng(server.name, device.unit, reg.table, reg.address)),
                        name=reg.name,
                    )
                    devices[device.unit].append(live)
                    self._registers[(server.name, device.unit, reg.table, reg.address)] = live
            self._servers.append(ModbusSimServer(server.name, server.host, server.port, devices, clock=self.elapsed))

    def _rng(self, server: str, unit: int, table: str, address: int) -> random.Random:
        # One generator per register, seeded from its identity: each noise sequence is
        # reproducible whatever order clients read the registers in.
        if self.config.seed is None:
            return random.Random()
        return random.Random(f"{self.config.seed}/{server}/{unit}/{table}/{address}")

    def elapsed(self) -> float:
        """Seconds since the fleet started: the time every signal is a function of."""
        return time.monotonic() - self._started_at

    async def start(self) -> None:
        """Start every server; all are listening when this returns.

        Raises SimulatorError (after stopping those already started) if one cannot listen.
        """
        self._started_at = time.monotonic()
        for server in self._servers:
            try:
                await server.start()
            except BaseException:
                await self.stop()
                raise
            self._running.append(server)
            log.info(
                "modbus server listening",
                extra={
                    "server": server.name,
                    "host": server.host,
                    "port": server.port,
                    "units": ",".join(str(d.unit) for d in self.config.server(server.name).devices),
                },
            )

    async def stop(self) -> None:
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

    @property
    def reads(self) -> int:
        """Read requests served so far, over all servers (function codes 3, 4 and 23)."""
        return sum(server.reads for server in self._servers)

    def value(self, server: str, unit: int, address: int, table: Table = "holding") -> float:
        """The signal's value now, before scaling and encoding.

        ``address`` is the register's configured (first) address. A register a client
        wrote still reports its signal here; the written words are in ``register().written``.
        A noisy signal draws a fresh sample, as a read would.
        """
        return self.register(server, unit, address, table).signal(self.elapsed())

    def register(self, server: str, unit: int, address: int, table: Table = "holding") -> LiveRegister:
        try:
            return self._registers[(server, unit, table, address)]
        except KeyError:
            raise KeyError(f"no {table} register at {address} on unit {unit} of server {server!r}") from None
