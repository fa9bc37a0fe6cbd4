"""The serial source's config: the sample loads, mistakes are reported with their dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

import gateway.sources.serial  # noqa: F401  registers the kind before gateway.config builds its union
from fieldlink.configkit import ConfigError
from gateway.config import load_gateway_config
from gateway.sources.serial import SerialConfig, SerialSource
from gateway.sources.serial.config import NmeaParserConfig

SAMPLE = Path(__file__).resolve().parents[2] / "configs" / "gateway-serial.toml"
HEAD = '[gateway]\nsite = "s"\nid = "g"\n[[sources]]\nkind = "serial"\nname = "p"\nport = "/dev/ttyUSB0"\n'


def test_the_sample_loads_and_builds_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIELDLINK_UPLINK_PASSWORD", "x")
    config = load_gateway_config(SAMPLE)
    sources = [s for s in config.sources if isinstance(s, SerialConfig)]
    assert [s.device for s in sources] == ["weather-1", "tank-7", "flow-2", "scale-1", "air-3"]
    weather = sources[0]
    assert weather.delimiter == b"\r\n"
    assert weather.stopbits == 1
    assert isinstance(weather.parser, NmeaParserConfig)
    assert weather.parser.extract[0].index == 2
    assert weather.fields["BARO"].scale == 1000
    assert sources[4].max_frame == 4000
    for source in sources:
        built = SerialSource(source)
        assert built.devices == [source.device]
        assert built.counters() == {}


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "broken.toml"
    path.write_text(HEAD + text)
    with pytest.raises(ConfigError) as caught:
        load_gateway_config(path)
    return [line.removeprefix(f"{path}: ") for line in caught.value.lines()]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'device = "a/b"\nparity = "pair"\nstopbits = 3\nbytesize = 9\nparser = { kind = "kv" }\n',
            [
                "sources[0].device: must not contain '/', got 'a/b'",
                "sources[0].bytesize: must be one of 5, 6, 7 or 8, got 9",
                "sources[0].parity: must be one of 'none', 'even', 'odd', 'mark' or 'space', got 'pair'",
                "sources[0].stopbits: must be one of 1, 1.5 or 2, got 3",
            ],
        ),
        (
            'device = "d"\nparser = { kind = "regex", pattern = "(unclosed" }\n',
            [
                "sources[0].parser.pattern: not a valid regular expression: "
                "missing ), unterminated subpattern at position 0"
            ],
        ),
        (
            'device = "d"\nparser = { kind = "regex", pattern = "T=([0-9]+)" }\n',
            ["sources[0].parser.pattern: needs at least one named group, such as (?P<temperature>[-\\d.]+)"],
        ),
        (
            'device = "d"\nparser = { kind = "csv", columns = [] }\n',
            ["sources[0].parser.columns: list should have at least 1 item after validation, not 0"],
        ),
        (
            'device = "d"\nparser = { kind = "csv", columns = ["", ""] }\n',
            ["sources[0].parser.columns: at least one column needs a name (empty names skip a column)"],
        ),
        (
            'device = "d"\nparser = { kind = "xml" }\n',
            ["sources[0].parser: unknown kind 'xml'; known kinds: 'kv', 'csv', 'json', 'regex', 'nmea'"],
        ),
        (
            'device = "d"\ndelimiter = ""\nencoding = "klingon"\nsilence_timeout = "0s"\nparser = { kind = "kv" }\n',
            [
                "sources[0].encoding: unknown text encoding 'klingon'",
                "sources[0].delimiter: must not be empty",
                "sources[0].silence_timeout: must be more than 0, got 0.0",
            ],
        ),
        (
            'device = "d"\nframe_length = 8\ndelimiter = ";"\nparser = { kind = "kv" }\n',
            ["sources[0].frame_length: set either delimiter or frame_length, not both"],
        ),
        (
            'device = "d"\nparser = { kind = "kv" }\nfields = { T = { type = "int", scale = 0.1 } }\n',
            ["sources[0].fields.T: scale and offset need a number field (type 'float' or 'auto'), not 'int'"],
        ),
        (
            'device = "d"\nparser = { kind = "csv", columns = ["a", "b"] }\nfields = { c = {} }\n',
            ["sources[0].fields: ['c'] not produced by the parser (it yields ['a', 'b'])"],
        ),
        (
            'device = "d"\nparser = { kind = "kv" }\nfields = { a = { name = "x" }, b = { name = "x" } }\n',
            ["sources[0].fields: 'a' and 'b' both become 'x'"],
        ),
        (
            'device = "d"\nparser = { kind = "nmea", extract = [{ sentence = "gga", index = 0, name = "x" }] }\n',
            [
                "sources[0].parser.extract[0].sentence: String should match pattern '^[A-Z][A-Z0-9]{2,7}$'",
                "sources[0].parser.extract[0].index: must be >= 1, got 0",
            ],
        ),
    ],
)
def test_mistakes_name_their_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert problems(tmp_path, text) == expected


def test_a_device_name_is_unique_across_sources(tmp_path: Path) -> None:
    second = '[[sources]]\nkind = "serial"\nname = "q"\nport = "/dev/ttyUSB1"\ndevice = "d"\nparser = { kind = "kv" }\n'
    assert problems(tmp_path, 'device = "d"\nparser = { kind = "kv" }\n' + second) == [
        "sources[1].device: device 'd' is already defined at sources[0].device"
    ]


def test_retry_max_and_frame_length_are_checked_against_other_keys(tmp_path: Path) -> None:
    text = (
        'device = "d"\nretry_min = "10s"\nretry_max = "5s"\nmax_frame = 8\nframe_length = 9\nparser = { kind = "kv" }\n'
    )
    assert problems(tmp_path, text) == [
        "sources[0].frame_length: must not be more than max_frame (8), got 9",
        "sources[0].retry_max: must not be shorter than retry_min (10s), got 5s",
    ]
