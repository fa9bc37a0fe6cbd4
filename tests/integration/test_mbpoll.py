"""Interoperability: Debian's ``mbpoll`` (an independent Modbus master) against firmware-sim.

mbpoll numbers references from 1 (``-r 101`` is address 100); its default float
word order is CDAB, ``-B`` makes it ABCD. Missing mbpoll skips these tests with
the package to install, and fails them under ``CI=true`` (``tests.rig``).
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from firmware_sim.config import load_sim_config
from firmware_sim.fleet import SimFleet
from tests.rig import require_binary

DEADLINE = 15.0

CONFIG = """
[[servers]]
name = "tcp"
port = {port}
{devices}
[[servers]]
name = "rtu"
transport = "rtu"
serial_port = "{tmp}/ttySIM"
{devices}
"""

DEVICES = """
  [[servers.devices]]
  unit = 1
    [[servers.devices.registers]]
    address = 100
    type = "float32"
    signal = { kind = "constant", value = 1.5 }
    [[servers.devices.registers]]
    address = 102
    type = "float32"
    byte_order = "CDAB"
    signal = { kind = "constant", value = -2.25 }
    [[servers.devices.registers]]
    address = 104
    type = "int16"
    signal = { kind = "constant", value = -7 }
    [[servers.devices.registers]]
    address = 105
    type = "int32"
    signal = { kind = "constant", value = -100000 }
    [[servers.devices.registers]]
    address = 0
    table = "input"
    signal = { kind = "constant", value = 230 }
    [[servers.devices.registers]]
    address = 0
    table = "coil"
    type = "bool"
    signal = { kind = "constant", value = 1 }
    [[servers.devices.registers]]
    address = 1
    table = "coil"
    type = "bool"
    signal = { kind = "constant", value = 0 }
    [[servers.devices.registers]]
    address = 7
    table = "discrete_input"
    type = "bool"
    signal = { kind = "constant", value = 1 }
"""


@pytest.fixture(name="mbpoll")
def mbpoll_fixture() -> str:
    return require_binary("mbpoll", "mbpoll")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def target(fleet: SimFleet, transport: str) -> list[str]:
    """mbpoll's options and device for one of the two servers."""
    server = fleet.server(transport)
    if transport == "tcp":
        return ["-m", "tcp", "-p", str(server.port), "127.0.0.1"]
    assert server.serial_port is not None
    return ["-m", "rtu", "-b", "19200", "-P", "none", server.serial_port]


async def mbpoll_run(binary: str, options: list[str], where: list[str], *values: str) -> tuple[int, str]:
    """One poll (``-1``) or one write; exit status and stdout + stderr."""
    *mode, device = where
    # "--": a negative value to write is not an option
    args = [*options, *mode, "-o", "1", "-1", device, *(["--", *values] if values else [])]
    proc = await asyncio.create_subprocess_exec(
        binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(DEADLINE / 2):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


def values(output: str) -> dict[int, str]:
    """``[101]: 	1.5`` lines -> {101: "1.5"}."""
    return {int(ref): value.strip() for ref, value in re.findall(r"^\[(\d+)\]:\s+(.+)$", output, re.MULTILINE)}


def run_with_fleet(tmp_path: Path, body: Callable[[SimFleet], Awaitable[None]]) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(CONFIG.format(port=free_port(), tmp=tmp_path, devices=DEVICES), encoding="utf-8")

    async def main() -> None:
        async with asyncio.timeout(DEADLINE), SimFleet(load_sim_config(path)) as fleet:
            await body(fleet)

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
def test_mbpoll_reads_every_table(tmp_path: Path, mbpoll: str, transport: str) -> None:
    async def body(fleet: SimFleet) -> None:
        where = target(fleet, transport)

        async def poll(*options: str) -> dict[int, str]:
            code, out = await mbpoll_run(mbpoll, ["-a", "1", *options], where)
            assert code == 0, out
            return values(out)

        assert await poll("-r", "101", "-c", "1", "-t", "4:float", "-B") == {101: "1.5"}
        assert await poll("-r", "103", "-c", "1", "-t", "4:float") == {103: "-2.25"}  # mbpoll's default: CDAB
        assert await poll("-r", "105", "-c", "1", "-t", "4") == {105: "65529 (-7)"}
        assert await poll("-r", "106", "-c", "1", "-t", "4:int", "-B") == {106: "-100000"}
        assert await poll("-r", "1", "-c", "1", "-t", "3") == {1: "230"}
        assert await poll("-r", "1", "-c", "2", "-t", "0") == {1: "1", 2: "0"}
        assert await poll("-r", "8", "-c", "1", "-t", "1") == {8: "1"}
        assert fleet.served(transport, 1).reads == 7

    run_with_fleet(tmp_path, body)


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
def test_mbpoll_writes_are_kept(tmp_path: Path, mbpoll: str, transport: str) -> None:
    async def body(fleet: SimFleet) -> None:
        where = target(fleet, transport)
        for options, value in (
            (["-r", "101", "-t", "4:float", "-B"], "12.5"),
            (["-r", "103", "-t", "4:float"], "-0.5"),
            (["-r", "105", "-t", "4"], "1234"),
            (["-r", "2", "-t", "0"], "1"),
        ):
            code, out = await mbpoll_run(mbpoll, ["-a", "1", *options], where, value)
            assert code == 0, out
        assert fleet.decoded(transport, 1, 100) == 12.5
        assert fleet.decoded(transport, 1, 102) == -0.5
        assert fleet.register(transport, 1, 102).written == [0x0000, 0xBF00]  # CDAB words of -0.5
        assert fleet.decoded(transport, 1, 104) == 1234
        assert fleet.decoded(transport, 1, 1, table="coil") is True
        assert fleet.served(transport, 1).writes == 4
        # And mbpoll reads back what it wrote.
        code, out = await mbpoll_run(mbpoll, ["-a", "1", "-r", "101", "-c", "1", "-t", "4:float", "-B"], where)
        assert (code, values(out)) == (0, {101: "12.5"}), out

    run_with_fleet(tmp_path, body)


def test_mbpoll_gets_silence_from_an_absent_unit_on_rtu(tmp_path: Path, mbpoll: str) -> None:
    async def body(fleet: SimFleet) -> None:
        code, out = await mbpoll_run(mbpoll, ["-a", "9", "-r", "1", "-c", "1", "-t", "4"], target(fleet, "rtu"))
        assert code != 0
        assert "timed out" in out
        assert fleet.server("rtu").unknown_unit_requests >= 1

    run_with_fleet(tmp_path, body)
