"""`fieldlink-gateway probe` against firmware-sim over TCP and RTU on a pty: every type x byte
order side by side, and a TOML tag that a gateway config accepts and that reads the same value."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from firmware_sim.config import load_sim_config
from firmware_sim.fleet import SimFleet
from gateway.sources.modbus.config import DeviceConfig
from tests.rig import free_port

PROBE = [sys.executable, "-m", "gateway.cli", "probe"]

SIM = """
[[servers]]
name = "meter"
transport = "{transport}"
{where}
  [[servers.devices]]
  unit = 3
    [[servers.devices.registers]]
    address = 100
    type = "float32"
    byte_order = "CDAB"
    signal = {{ kind = "constant", value = 231.7 }}
    [[servers.devices.registers]]
    address = 102
    type = "int32"
    byte_order = "DCBA"
    signal = {{ kind = "constant", value = -123456 }}
"""


async def _probe(sim_text: str, tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "sim.toml"
    path.write_text(sim_text)
    async with SimFleet(load_sim_config(path)):
        process = await asyncio.create_subprocess_exec(
            *PROBE,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    return subprocess.CompletedProcess(args, process.returncode or 0, out.decode(), err.decode())


def _row(output: str, name: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith(name + " "))
    return line.split()[1:]


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
def test_probe_shows_every_interpretation_and_prints_a_working_tag(tmp_path: Path, transport: str) -> None:
    port, tty = free_port(), tmp_path / "ttyProbe"
    if transport == "tcp":
        where, url, extra = f"port = {port}", f"tcp://127.0.0.1:{port}", []
    else:
        where, url, extra = f'serial_port = "{tty}"', f"rtu://{tty}", ["--baudrate", "19200", "--parity", "N"]
    sim = SIM.format(transport=transport, where=where)
    args = [
        url,
        "--unit",
        "3",
        "--address",
        "100",
        "--count",
        "4",
        *extra,
        "--pick",
        "float32:CDAB",
        "--name",
        "voltage",
    ]
    result = asyncio.run(_probe(sim, tmp_path, args))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{url} unit 3: holding 100..103" in out
    assert _row(out, "float32@100")[1] == "231.7"  # the CDAB column shows the real value
    assert _row(out, "int32@102")[3] == "-123456"  # and DCBA the other one, side by side
    header = next(line for line in out.splitlines() if line.startswith("type@address"))
    assert header.split()[1:] == ["ABCD", "CDAB", "BADC", "DCBA"]

    # The printed tag, pasted into a device, is a valid config for the same value.
    toml = out[out.index("[[sources.devices.registers]]") :]
    tag = tomllib.loads(toml)["sources"]["devices"]["registers"][0]
    assert tag == {"name": "voltage", "table": "holding", "address": 100, "type": "float32", "byte_order": "CDAB"}
    DeviceConfig.model_validate({"name": "meter", "unit": 3, "registers": [tag]})


def test_probe_says_why_it_cannot_read(tmp_path: Path) -> None:
    port = free_port()
    sim = SIM.format(transport="tcp", where=f"port = {port}")
    refused = asyncio.run(_probe(sim, tmp_path, [f"tcp://127.0.0.1:{port}", "--unit", "3", "--address", "500"]))
    assert refused.returncode == 1
    assert "exception 2 (illegal data address)" in refused.stderr
    closed = subprocess.run(
        [*PROBE, f"tcp://127.0.0.1:{free_port()}", "--timeout", "1s"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert closed.returncode == 1
    assert "cannot connect to 127.0.0.1" in closed.stderr
    bad = subprocess.run([*PROBE, "http://x", "--count", "4"], capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 2
    assert "expected tcp://HOST:PORT" in bad.stderr
