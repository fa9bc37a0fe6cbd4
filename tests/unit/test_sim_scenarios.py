"""Fleets from a few lines (``count``), RTU servers, and the new register keys: what loads, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldlink.configkit import ConfigError
from firmware_sim.config import StepSignal, load_sim_config
from firmware_sim.fleet import SimFleet

REGISTER = """
    [[servers.devices.registers]]
    address = 0
    signal = { kind = "constant", value = 1 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sim.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_sim_config(path)
    return [line.removeprefix(f"{path}: ") for line in caught.value.lines()]


def test_count_expands_servers_and_units(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [[servers]]
        name = "meter"
        port = 20000
        count = 200
          [[servers.devices]]
          unit = 10
          count = 10
          name = "m"
          {REGISTER}
          [[servers.devices]]
          unit = 1
          {REGISTER}
        [[servers]]
        name = "bus"
        transport = "rtu"
        serial_port = "{tmp_path}/ttyBUS"
        count = 2
          [[servers.devices]]
          unit = 1
          count = 3
          {REGISTER}
        [[servers]]
        name = "single"
        port = 20200
          [[servers.devices]]
          unit = 5
          {REGISTER}
        """,
    )
    expanded = load_sim_config(path).expand()
    assert len(expanded) == 203
    assert [(s.name, s.port) for s in expanded[:2]] == [("meter-0", 20000), ("meter-1", 20001)]
    assert (expanded[199].name, expanded[199].port) == ("meter-199", 20199)
    assert sorted(expanded[0].devices) == [1, *range(10, 20)]
    assert [(s.name, s.serial_port) for s in expanded[200:202]] == [
        ("bus-0", f"{tmp_path}/ttyBUS-0"),
        ("bus-1", f"{tmp_path}/ttyBUS-1"),
    ]
    assert sorted(expanded[200].devices) == [1, 2, 3]
    assert (expanded[202].name, expanded[202].port) == ("single", 20200)  # count 1: the name as written

    fleet = SimFleet(load_sim_config(path))
    assert len(fleet.servers) == 203
    assert fleet.value("meter-199", 19, 0) == 1
    assert fleet.register("bus-1", 3, 0).table == "holding"


def test_count_validation(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [[servers]]
        name = "a"
        port = 65530
        count = 10
          [[servers.devices]]
          unit = 240
          count = 10
          {REGISTER}
          [[servers.devices]]
          unit = 100
          count = 5
          {REGISTER}
          [[servers.devices]]
          unit = 104
          {REGISTER}
        """,
    )
    assert problems(path) == [
        "servers[0].count: 10 servers take ports 65530..65539, past 65535",
        "servers[0].devices[0].count: 10 units take ids 240..249, past 247",
        "servers[0].devices[2].unit: unit 104 is already used by devices[1]",
    ]


def test_count_of_zero_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [[servers]]
        name = "b"
        port = 100
        count = 0
          [[servers.devices]]
          unit = 1
          count = -1
          {REGISTER}
        """,
    )
    assert problems(path) == [
        "servers[0].count: must be >= 1, got 0",
        "servers[0].devices[0].count: must be >= 1, got -1",
    ]


def test_expanded_names_and_ports_must_not_clash(tmp_path: Path) -> None:
    device = f"""
          [[servers.devices]]
          unit = 1
          {REGISTER}
    """
    path = write(
        tmp_path,
        f"""
        [[servers]]
        name = "a"
        port = 21000
        count = 3
        {device}
        [[servers]]
        name = "a-2"
        port = 21002
        {device}
        [[servers]]
        name = "bus"
        transport = "rtu"
        serial_port = "{tmp_path}/tty"
        {device}
        [[servers]]
        name = "bus2"
        transport = "rtu"
        serial_port = "{tmp_path}/tty"
        {device}
        """,
    )
    assert problems(path) == [
        "servers[1].name: 'a-2' is already used by servers[0]",
        "servers[1].port: 127.0.0.1:21002 is already used by servers[0]",
        f"servers[3].serial_port: {tmp_path}/tty is already used by servers[2]",
    ]


def test_transport_keys(tmp_path: Path) -> None:
    device = f"""
          [[servers.devices]]
          unit = 1
          {REGISTER}
    """
    path = write(
        tmp_path,
        f"""
        [[servers]]
        name = "a"
        transport = "rtu"
        port = 502
        {device}
        [[servers]]
        name = "b"
        serial_port = "/tmp/x"
        {device}
        [[servers]]
        name = "c"
        transport = "rtu_tcp"
        {device}
        [[servers]]
        name = "d"
        transport = "serial"
        port = 1
        {device}
        """,
    )
    assert problems(path) == [
        "servers[3].transport: must be one of 'tcp', 'rtu' or 'rtu_tcp', got 'serial'",
    ]
    path.write_text(path.read_text().replace('"serial"', '"tcp"'))
    assert problems(path) == [
        "servers[0].serial_port: required key is missing (transport is rtu)",
        "servers[0].port: an rtu server has a serial_port, not a port",
        "servers[1].port: required key is missing (transport is tcp)",
        "servers[1].serial_port: only an rtu server has one (transport is tcp)",
        "servers[2].port: required key is missing (transport is rtu_tcp)",
    ]


def test_new_types_tables_and_signals_load(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        seed = 3
        [[servers]]
        name = "line"
        port = 15020
          [[servers.devices]]
          unit = 1
            [[servers.devices.registers]]
            address = 0
            type = "float64"
            byte_order = "GHEFCDAB"
            signal = { kind = "random_walk", start = 20, step = 0.1, min = 0, max = 40 }
            [[servers.devices.registers]]
            address = 4
            type = "string"
            length = 4
            byte_order = "BADC"
            signal = { kind = "constant", value = "SN-1234" }
            [[servers.devices.registers]]
            address = 8
            type = "bool"
            bit = 0
            signal = { kind = "step", values = [0, 1], hold = "2s" }
            [[servers.devices.registers]]
            address = 8
            type = "bool"
            bit = 1
            signal = { kind = "step", values = [1, 0, 1], hold = ["1s", "500ms", 2] }
            [[servers.devices.registers]]
            address = 0
            table = "coil"
            type = "bool"
            signal = { kind = "constant", value = 1 }
            [[servers.devices.registers]]
            address = 0
            table = "discrete_input"
            type = "bool"
            signal = { kind = "constant", value = 0 }
        """,
    )
    config = load_sim_config(path)
    regs = config.servers[0].devices[0].registers
    assert regs[0].order == "CDAB"
    assert [r.width for r in regs] == [4, 4, 1, 1, 1, 1]
    step = regs[3].signal
    assert isinstance(step, StepSignal)
    assert step.holds() == [1.0, 0.5, 2.0]
    fleet = SimFleet(config)
    assert fleet.decoded("line", 1, 4) == "SN-1234"
    assert fleet.decoded("line", 1, 8, bit=1) is True
    assert fleet.decoded("line", 1, 0, table="coil") is True


def test_register_key_rules(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[servers]]
        name = "line"
        port = 15020
          [[servers.devices]]
          unit = 1
            [[servers.devices.registers]]
            address = 0
            table = "coil"
            type = "uint16"
            signal = { kind = "constant", value = 1 }
            [[servers.devices.registers]]
            address = 0
            type = "bool"
            signal = { kind = "constant", value = 1 }
            [[servers.devices.registers]]
            address = 1
            type = "int32"
            bit = 3
            length = 2
            byte_order = "HGFEDCBA"
            signal = { kind = "constant", value = 1 }
            [[servers.devices.registers]]
            address = 10
            type = "string"
            signal = { kind = "constant", value = "x" }
            [[servers.devices.registers]]
            address = 20
            type = "string"
            length = 2
            signal = { kind = "sine", amplitude = 1, period = 1 }
            [[servers.devices.registers]]
            address = 30
            type = "string"
            length = 2
            signal = { kind = "constant", value = "ABCDE" }
            [[servers.devices.registers]]
            address = 40
            type = "float32"
            signal = { kind = "constant", value = "ABCDE" }
            [[servers.devices.registers]]
            address = 50
            type = "bool"
            bit = 4
            signal = { kind = "constant", value = 1 }
            [[servers.devices.registers]]
            address = 50
            type = "bool"
            bit = 4
            signal = { kind = "constant", value = 1 }
            [[servers.devices.registers]]
            address = 51
            signal = { kind = "step", values = [1, 2], hold = ["1s"] }
            [[servers.devices.registers]]
            address = 52
            signal = { kind = "random_walk", step = 1, min = 5, max = 5 }
        """,
    )
    regs = "servers[0].devices[0].registers"
    assert problems(path) == [
        f"{regs}[0].type: a coil holds a bool, got 'uint16'",
        f"{regs}[1].bit: required key is missing (a bool in the holding table is one bit of a register: 0..15)",
        f"{regs}[2].bit: only a bool in a holding or input register has a bit",
        f"{regs}[2].length: only a string has a length, not int32",
        f"{regs}[2].byte_order: HGFEDCBA names the bytes of a 64-bit value; int32 takes ABCD, CDAB, BADC or DCBA",
        f"{regs}[3].length: required key is missing (a string's size in registers)",
        f'{regs}[4].signal: a string register needs a constant text: {{ kind = "constant", value = "..." }}',
        f"{regs}[5].signal.value: 5 characters do not fit 2 registers (2 characters each)",
        f"{regs}[6].signal.value: expected a number for a float32, got 'ABCDE'",
        f"{regs}[8].address: bit 4 of address 50 is already used by registers[7]",
        f"{regs}[9].signal.hold: one duration per value: 2 values, 1 durations",
        f"{regs}[10].signal.max: must be > min (5.0), got 5.0",
    ]
