"""Configs: every sample loads; broken files give every problem with file and dotted key."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloud.config import load_cloud_config
from fieldlink.configkit import ConfigError
from firmware_sim.config import load_sim_config
from gateway.config import load_gateway_config
from gateway.sources.registry import source_kinds
from tests.rig.programs import BIN

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SAMPLE_SECRETS = {"INFLUXDB_TOKEN": "t0ken", "SMTP_PASSWORD": "pa55", "TWILIO_TOKEN": "tw1l10"}


def _loader(path: Path) -> Callable[[Path], Any]:
    name = path.name
    if "sim" in name:
        return load_sim_config
    if "gateway" in name:
        return load_gateway_config
    if "cloud" in name:
        return load_cloud_config
    raise AssertionError(f"{path}: no test loads this sample config; name it *gateway*, *cloud* or *sim*")


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.toml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_sample_config_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SAMPLE_SECRETS.items():
        monkeypatch.setenv(name, value)
    assert _loader(path)(path) is not None


def test_samples_cover_every_program() -> None:
    names = [p.name for p in CONFIGS.rglob("*.toml")]
    for program in ("gateway", "cloud", "sim"):
        assert any(program in n for n in names)


def _problems(tmp_path: Path, loader: Callable[[Path], Any], text: str) -> list[str]:
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        loader(path)
    return [line.removeprefix(f"{path}: ") for line in caught.value.lines()]


GATEWAY_MINIMAL = '[gateway]\nsite = "s"\nid = "g"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GATEWAY_MINIMAL + '[[sources]]\nkind = "modbus_tcp"\nname = "bus"\nhost = "h"\nport = 70000\n'
            '[[sources.devices]]\nname = "d"\nregisters = [{ name = "t", address = 0, type = "float32" }]\n',
            ["sources[0].port: must be 1..65535, got 70000"],
        ),
        (
            '[gateway]\nsite = "plant/a"\n',
            ["gateway.site: must not contain '/', got 'plant/a'", "gateway.id: required key is missing"],
        ),
        (
            GATEWAY_MINIMAL + '[uplink]\nurl = "http://cloud"\nmax_inflight = 0\nkeepalive = "soon"\n',
            [
                "uplink.url: must start with mqtt:// or tcp://, got 'http://cloud'",
                "uplink.keepalive: expected a duration such as '500ms' or '10s', got 'soon'",
                "uplink.max_inflight: must be >= 1, got 0",
            ],
        ),
        (
            GATEWAY_MINIMAL + '[[sources]]\nkind = "modbus_ascii"\nname = "x"\n',
            [f"sources[0].kind: unknown source kind 'modbus_ascii' (known: {', '.join(sorted(source_kinds()))})"],
        ),
        (
            GATEWAY_MINIMAL + '[[sources]]\nkind = "modbus_tcp"\nname = "bus"\nhost = "h"\n'
            '[[sources.devices]]\nname = "d"\n'
            'registers = [{ name = "t", address = 0, type = "float128", colour = 1 }]\n',
            [
                "sources[0].devices[0].registers[0].type: must be one of 'bool', 'uint16', 'int16', 'uint32', "
                "'int32', 'uint64', 'int64', 'float32', 'float64' or 'string', got 'float128'",
                "sources[0].devices[0].registers[0].colour: unknown key",
            ],
        ),
        (
            GATEWAY_MINIMAL + '[[sources]]\nkind = "modbus_tcp"\nname = "bus"\nhost = "h"\n'
            '[[sources.devices]]\nname = "d"\nregisters = [{ name = "t", address = 0, type = "uint16" }]\n'
            '[[sources]]\nkind = "modbus_tcp"\nname = "bus"\nhost = "h2"\n'
            '[[sources.devices]]\nname = "d"\nregisters = [{ name = "t", address = 0, type = "uint16" }]\n',
            [
                "sources[1].name: 'bus' is already used by sources[0]",
                "sources[1].devices[0].name: device 'd' is already defined at sources[0].devices[0].name",
            ],
        ),
        (
            GATEWAY_MINIMAL + '[uplink]\npassword = "${FIELDLINK_TEST_UNSET_SECRET}"\n',
            ["uplink.password: environment variable FIELDLINK_TEST_UNSET_SECRET is not set"],
        ),
        (
            '[gateway\nsite = "s"',
            ["not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 9)"],
        ),
    ],
)
def test_broken_gateway_configs(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert _problems(tmp_path, load_gateway_config, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[store]\nkind = "influxdb"\n',
            ["store.url: required key is missing"],
        ),
        (
            '[store]\nkind = "timescale"\n',
            ["store.kind: unknown store kind 'timescale' (known: influxdb, sqlite)"],
        ),
        (
            '[[rules]]\nname = "hot"\nmetric = "t"\nabove = 80\nclear = 85\nnotify = ["pager"]\n',
            ["rules[0].levels[0]: clear (85.0) must not be above 'above' (80.0)"],
        ),
        (
            '[[rules]]\nname = "hot"\nmetric = "t"\nabove = 80\nnotify = ["pager"]\n',
            ["rules[0].notify[0]: no notifier named 'pager' (known: none configured)"],
        ),
        (
            '[[notifiers]]\nkind = "email"\nname = "ops"\nhost = "smtp"\nport = 0\nfrom = "a@b"\nto = []\n',
            [
                "notifiers[0].port: must be 1..65535, got 0",
                "notifiers[0].to: list should have at least 1 item after validation, not 0",
            ],
        ),
        (
            '[broker]\nembedded = true\nurl = "mqtts://cloud.example"\n[broker.tls]\n',
            ["broker.tls: the embedded broker speaks plain MQTT only; remove the table"],
        ),
        (
            '[broker]\ntopic_prefix = "tenant/+"\n',
            ["broker.topic_prefix: must not contain MQTT wildcards, got 'tenant/+'"],
        ),
    ],
)
def test_broken_cloud_configs(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert _problems(tmp_path, load_cloud_config, text) == expected


def test_secrets_from_the_environment_never_show_in_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFLUXDB_TOKEN", "very-secret-token")
    monkeypatch.setenv("SMTP_PASSWORD", "very-secret-password")
    config = load_cloud_config(CONFIGS / "cloud.toml")
    assert config.store.token.get_secret_value() == "very-secret-token"
    text = repr(config) + str(config) + config.model_dump_json()
    assert "very-secret" not in text


def _run(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN / program, *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("program", ["fieldlink-gateway", "fieldlink-cloud"])
def test_cli_check_config_and_run_refuse_a_bad_file_with_the_same_lines(tmp_path: Path, program: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[broker]\nurl = "ftp://x"\n' if program == "fieldlink-cloud" else '[gateway]\nid = "g"\n')
    expected = (
        f"{path}: broker.url: must start with mqtt:// or tcp://, got 'ftp://x'\n"
        if program == "fieldlink-cloud"
        else f"{path}: gateway.site: required key is missing\n"
    )
    check = _run(program, "check-config", str(path))
    assert (check.returncode, check.stdout) == (1, expected)
    run = _run(program, "run", "--config", str(path))
    assert (run.returncode, run.stderr) == (2, expected)
    ok = CONFIGS / ("cloud-sqlite.toml" if program == "fieldlink-cloud" else "gateway.toml")
    good = _run(program, "check-config", str(ok))
    assert good.returncode == 0
    assert good.stdout.startswith(f"{ok}: ok")


@pytest.mark.parametrize(
    ("broker", "filters"),
    [
        ({}, ["fl/+/+/dev/+/telemetry", "fl/+/+/batch"]),
        ({"sites": ["a", "b"]}, ["fl/a/+/dev/+/telemetry", "fl/a/+/batch", "fl/b/+/dev/+/telemetry", "fl/b/+/batch"]),
        (
            {"shared_group": "ingest", "topic_prefix": "t1"},
            ["$share/ingest/t1/fl/+/+/dev/+/telemetry", "$share/ingest/t1/fl/+/+/batch"],
        ),
    ],
)
def test_cloud_subscriptions_follow_sites_and_shared_group(broker: dict[str, object], filters: list[str]) -> None:
    from cloud.config import BrokerSection  # noqa: PLC0415

    assert BrokerSection.model_validate(broker).filters() == filters


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ('[broker]\nshared_group = "a/b"\n', "broker.shared_group", "must not contain '/'"),
        ('[broker]\nsites = ["+"]\n', "broker.sites[0]", "must not contain '+'"),
        ('[ingest]\ndead_letter_topic = "dl/#"\n', "ingest.dead_letter_topic", "without wildcards"),
        ('[ingest]\nmax_message_bytes = "lots"\n', "ingest.max_message_bytes", ""),
    ],
)
def test_cloud_scale_out_and_ingest_keys_are_checked(tmp_path: Path, section: str, key: str, message: str) -> None:
    from cloud.config import load_cloud_config  # noqa: PLC0415
    from fieldlink.configkit import ConfigError  # noqa: PLC0415

    path = tmp_path / "cloud.toml"
    path.write_text(section)
    with pytest.raises(ConfigError) as error:
        load_cloud_config(path)
    (line,) = error.value.lines()
    assert line.startswith(f"{path}: {key}: ")
    assert message in line


def test_secrets_come_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    path = tmp_path / "gateway.toml"
    path.write_text(f'[gateway]\nsite = "s"\nid = "g"\n[uplink]\nusername = "u"\npassword_file = "{secret}"\n')
    assert load_gateway_config(path).uplink.password.get_secret_value() == "s3cret"  # type: ignore[union-attr]

    path.write_text(f'[gateway]\nsite = "s"\nid = "g"\n[uplink]\npassword = "x"\npassword_file = "{secret}"\n')
    with pytest.raises(ConfigError) as both:
        load_gateway_config(path)
    assert both.value.lines() == [f"{path}: uplink.password_file: set password or password_file, not both"]

    path.write_text(f'[gateway]\nsite = "s"\nid = "g"\n[uplink]\npassword_file = "{tmp_path / "missing"}"\n')
    with pytest.raises(ConfigError) as missing:
        load_gateway_config(path)
    assert missing.value.lines() == [
        f"{path}: uplink.password_file: cannot read {tmp_path / 'missing'}: No such file or directory"
    ]
