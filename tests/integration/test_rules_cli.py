"""`fieldlink-cloud rules test`: recorded series through the configured rules and routing,
nothing sent, one JSON line per notification that would go out."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.rig.programs import BIN

DATA = Path(__file__).resolve().parents[1] / "data" / "alerts"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def rules_test(
    series: Path, config: Path = DATA / "rules.toml", *extra: str, env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    result = subprocess.run(
        [BIN / "fieldlink-cloud", "rules", "test", "--config", str(config), str(series), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    for line in lines:
        assert {"time", "rule", "device", "state", "severity", "receiver"} <= line.keys()
    return lines


def brief(lines: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(n["time"], n["rule"], n["device"], n["state"], n["severity"], n["receiver"]) for n in lines]


def test_hysteresis_a_value_hovering_around_the_threshold_notifies_once(tmp_path: Path) -> None:
    series = tmp_path / "hover.csv"
    values = [70, 81, 79, 80.5, 78, 81, 76, 79, 74, 73]
    series.write_text(
        "time,site,gateway,device,metric,value\n"
        + "".join(f"{i},plant-a,gw-01,boiler-1,temperature,{v}\n" for i, v in enumerate(values))
    )
    assert brief(rules_test(series)) == [
        (1.0, "hot", "boiler-1", "firing", "critical", "hook"),
        (8.0, "hot", "boiler-1", "resolved", "critical", "hook"),
    ]


def test_durations_for_and_keep_firing_for_with_iso_times() -> None:
    lines = rules_test(DATA / "pressure-dips.csv")
    # The 2 s dip is too short for `for = "10s"`; the dip from 10 s lasts, so it fires at 22 s
    # (10 s after it began: the first record past the duration), and clears once it has been
    # back above 1.8 for 5 s (above at 30 s; the first record 5 s later is at 40 s).
    assert brief(lines) == [
        ("2026-11-27T08:00:22.000Z", "low-pressure", "boiler-1", "firing", "major", "hook"),
        ("2026-11-27T08:00:40.000Z", "low-pressure", "boiler-1", "resolved", "major", "hook"),
    ]
    assert lines[0]["value"] == 1.4


def test_deadman_fires_repeats_and_clears() -> None:
    lines = rules_test(DATA / "silent-pump.csv")
    assert [(n["time"], n["status"], n["state"]) for n in lines] == [
        (50.2, "firing", "firing"),  # last record at 20 s, silent for more than 30 s (0.2 s ticks)
        (110.2, "reminder", "firing"),  # repeat_interval 60 s
        (170.2, "reminder", "firing"),
        (200.0, "resolved", "resolved"),  # data is back
    ]
    assert {n["rule"] for n in lines} == {"pump-silent"}


def test_the_sample_config_with_every_feature_replays_the_boiler_series() -> None:
    env = {"SMTP_PASSWORD": "x", "TWILIO_TOKEN": "x", "PATH": "/usr/bin:/bin"}
    lines = rules_test(DATA / "boiler.csv", CONFIGS / "cloud-alerts.toml", "--extra", "60", env=env)
    boiler = [(n["time"], n["state"], n["severity"], n["receiver"]) for n in lines if n["rule"] == "boiler-temperature"]
    # Critical goes to mail and chat (the critical route); resolved after keep_firing_for.
    assert boiler == [
        (15.0, "firing", "critical", "ops-mail"),
        (15.0, "firing", "critical", "chat"),
        (90.0, "resolved", "critical", "ops-mail"),
        (90.0, "resolved", "critical", "chat"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("when,site\n", "the header must be time,site,gateway,device,metric,value"),
        ("time,site,gateway,device,metric,value\nsoon,a,b,c,d,1\n", ":2: time 'soon' is neither seconds nor ISO 8601"),
        ("time,site,gateway,device,metric,value\n1,a,b,c,d\n", ":2: expected 6 fields, got 5"),
        ("time,site,gateway,device,metric,value\n1,a,b,c,d,1\n2026-01-01T00:00:00Z,a,b,c,d,1\n", ":3: mixes"),
    ],
)
def test_a_bad_series_names_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    series = tmp_path / "bad.csv"
    series.write_text(text)
    result = subprocess.run(
        [BIN / "fieldlink-cloud", "rules", "test", "--config", str(DATA / "rules.toml"), str(series)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"{series}" in result.stderr
    assert message in result.stderr
