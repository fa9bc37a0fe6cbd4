"""The simulator's config: what loads, and the exact lines a broken file produces."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldlink.configkit import ConfigError
from firmware_sim.config import RampSignal, SineSignal, load_sim_config
from firmware_sim.fleet import SimFleet

SAMPLE = Path(__file__).resolve().parents[2] / "configs" / "sim.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sim.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_sim_config(path)
    return caught.value.lines()


def test_sample_config_loads() -> None:
    # The sample is the annotated reference: it should use every transport, table, type and signal.
    config = load_sim_config(SAMPLE)
    assert [s.transport for s in config.servers] == ["tcp", "rtu", "tcp", "rtu_tcp"]
    devices = config.servers[0].devices
    assert [d.unit for d in devices] == [1, 2, 3]
    registers = [r for s in config.servers for d in s.devices for r in d.registers]
    assert {r.type for r in registers} == {
        "float32", "int16", "uint16", "uint32", "bool", "string", "uint64", "float64"
    }  # fmt: skip
    assert {r.table for r in registers} == {"holding", "input", "coil", "discrete_input"}
    assert {r.signal.kind for r in registers} == {"constant", "ramp", "sine", "step", "random_walk"}
    expanded = config.expand()
    assert len(expanded) == 1 + 1 + 100 + 1
    assert sorted(expanded[1].devices) == [1, 10, 11]


def test_defaults_and_durations(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[servers]]
        name = "line1"
        port = 15020
          [[servers.devices]]
          unit = 1
            [[servers.devices.registers]]
            address = 0
            signal = { kind = "sine", amplitude = 1, period = "5m", phase = "500ms" }
            [[servers.devices.registers]]
            address = 1
            signal = { kind = "ramp", slope = -1, min = -10, max = 10 }
        """,
    )
    config = load_sim_config(path)
    server = config.servers[0]
    sine, ramp = (r.signal for r in server.devices[0].registers)
    assert config.seed is None
    assert server.host == "127.0.0.1"
    assert server.devices[0].registers[0].table == "holding"
    assert server.devices[0].registers[0].type == "uint16"
    assert server.devices[0].registers[0].scale == 1.0
    assert isinstance(sine, SineSignal)
    assert (sine.offset, sine.period, sine.phase, sine.noise) == (0.0, 300.0, 0.5, 0.0)
    assert isinstance(ramp, RampSignal)
    assert (ramp.start, ramp.min, ramp.max) == (0.0, -10.0, 10.0)


def test_same_address_in_holding_and_input_is_no_overlap(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[servers]]
        name = "line1"
        port = 15020
          [[servers.devices]]
          unit = 1
            [[servers.devices.registers]]
            address = 0
            type = "float32"
            signal = { kind = "constant", value = 1 }
            [[servers.devices.registers]]
            address = 1
            table = "input"
            type = "float32"
            signal = { kind = "constant", value = 1 }
        """,
    )
    load_sim_config(path)


def test_overlapping_registers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[servers]]
        name = "line1"
        port = 15020
          [[servers.devices]]
          unit = 1
            [[servers.devices.registers]]
            address = 0
            signal = { kind = "constant", value = 1 }
          [[servers.devices]]
          unit = 2
            [[servers.devices.registers]]
            address = 4
            signal = { kind = "constant", value = 1 }
            [[servers.devices.registers]]
            address = 0
            type = "float32"
            signal = { kind = "constant", value = 1 }
            [[servers.devices.registers]]
            address = 1
            type = "int32"
            signal = { kind = "constant", value = 1 }
            [[servers.devices.registers]]
            address = 65535
            type = "uint32"
            signal = { kind = "constant", value = 1 }
        """,
    )
    assert problems(path) == [
        f"{path}: servers[0].devices[1].registers[2].address: overlaps registers[1] (addresses 0..1)",
        f"{path}: servers[0].devices[1].registers[3].address: "
        "uint32 takes addresses 65535..65536, past the last one (65535)",
    ]


def test_duplicate_names_endpoints_and_units(tmp_path: Path) -> None:
    device = """
          [[servers.devices]]
          unit = 7
            [[servers.devices.registers]]
            address = 0
            signal = { kind = "constant", value = 1 }
    """
    path = write(
        tmp_path,
        f"""
        [[servers]]
        name = "line1"
        port = 15020
        {device}
        {device}
        [[servers]]
        name = "line1"
        port = 15021
        {device}
        [[servers]]
        name = "line2"
        port = 15020
        {device}
        """,
    )
    assert problems(path) == [
        f"{path}: servers[0].devices[1].unit: unit 7 is already used by devices[0]",
        f"{path}: servers[1].name: 'line1' is already used by servers[0]",
        f"{path}: servers[2].port: 127.0.0.1:15020 is already used by servers[0]",
    ]


def test_schema_errors_are_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        seed = "one"
        [[servers]]
        name = "line1"
        port = 70000
          [[servers.devices]]
          unit = 248
            [[servers.devices.registers]]
            address = 0
            table = "coils"
            type = "float16"
            signal = { kind = "sine", amplitude = 5.0, period = "0s", noise = -1 }
            [[servers.devices.registers]]
            address = 2
            scale = 0
            signal = { kind = "sawtooth" }
            [[servers.devices.registers]]
            address = -1
            signal = { kind = "ramp", start = 1, colour = "red" }
            [[servers.devices.registers]]
            address = 3
            signal = { value = 1 }
        """,
    )
    regs = "servers[0].devices[0].registers"
    assert problems(path) == [
        f"{path}: servers[0].port: must be 1..65535, got 70000",
        f"{path}: servers[0].devices[0].unit: must be <= 247, got 248",
        f"{path}: {regs}[0].table: must be one of 'coil', 'discrete_input', 'holding' or 'input', got 'coils'",
        f"{path}: {regs}[0].type: must be one of 'bool', 'int16', 'uint16', 'int32', 'uint32', 'int64', 'uint64', "
        "'float32', 'float64' or 'string', got 'float16'",
        f"{path}: {regs}[0].signal.period: must be > 0, got '0s'",
        f"{path}: {regs}[0].signal.noise: must be >= 0.0, got -1",
        f"{path}: {regs}[1].scale: must not be 0 (raw = value / scale)",
        f"{path}: {regs}[1].signal: unknown kind 'sawtooth'; "
        "known kinds: 'constant', 'ramp', 'sine', 'step', 'random_walk'",
        f"{path}: {regs}[2].address: must be >= 0, got -1",
        f"{path}: {regs}[2].signal.slope: required key is missing",
        f"{path}: {regs}[2].signal.colour: unknown key",
        f"{path}: {regs}[3].signal: required key 'kind' is missing",
        f"{path}: seed: expected an integer, got 'one'",
    ]


def test_ramp_bounds(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[servers]]
        name = "line1"
        port = 15020
          [[servers.devices]]
          unit = 1
            [[servers.devices.registers]]
            address = 0
            signal = { kind = "ramp", slope = 1, max = 100 }
            [[servers.devices.registers]]
            address = 1
            signal = { kind = "ramp", slope = 1, min = 5, max = 5 }
        """,
    )
    assert problems(path) == [
        f"{path}: servers[0].devices[0].registers[0].signal.min: a ramp wraps between min and max: set both or neither",
        f"{path}: servers[0].devices[0].registers[1].signal.max: must be > min (5.0), got 5.0",
    ]


def test_empty_lists_are_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "servers = []\n")
    assert problems(path) == [f"{path}: nothing to simulate: add [[servers]] or [[serial_sensors]]"]
    path = write(tmp_path, '[[serial_sensors]]\nname = "x"\nformat = "nmea"\n')
    assert problems(path) == [
        f"{path}: serial_dir is required with serial_sensors (the folder for their port symlinks)"
    ]


def noise_fleet(tmp_path: Path, seed: int) -> SimFleet:
    path = write(
        tmp_path,
        f"""
        seed = {seed}
        [[servers]]
        name = "line1"
        port = 15020
          [[servers.devices]]
          unit = 1
            [[servers.devices.registers]]
            address = 0
            signal = {{ kind = "sine", offset = 10, amplitude = 0, period = "1s", noise = 1 }}
            [[servers.devices.registers]]
            address = 1
            signal = {{ kind = "sine", offset = 10, amplitude = 0, period = "1s", noise = 1 }}
        """,
    )
    return SimFleet(load_sim_config(path))


def test_seed_makes_each_registers_noise_reproducible(tmp_path: Path) -> None:
    # amplitude 0: the value is offset + noise, so time does not matter here.
    first, again, other = noise_fleet(tmp_path, 1), noise_fleet(tmp_path, 1), noise_fleet(tmp_path, 2)
    series = [first.value("line1", 1, 0) for _ in range(50)]
    # Reading another register in between does not shift this register's sequence.
    interleaved = []
    for _ in range(50):
        again.value("line1", 1, 1)
        interleaved.append(again.value("line1", 1, 0))
    assert series == interleaved
    assert series != [other.value("line1", 1, 0) for _ in range(50)]
    assert series != [first.value("line1", 1, 1) for _ in range(50)]  # registers differ from each other
