"""Fuzzing the decoders that take input from outside (hypothesis): whatever arrives, the only
exception that leaves is the decoder's own error with a message, never a crash."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldlink.configkit import ConfigError
from fieldlink.wire import BadCommand, WireError, decode, decode_command, decode_state
from gateway.config import load_gateway_config
from gateway.sources.serial.config import (
    CsvParserConfig,
    JsonParserConfig,
    KvParserConfig,
    NmeaParserConfig,
    RegexParserConfig,
)
from gateway.sources.serial.parsers import FrameError, build_parser
from gateway.sources.serial.values import FieldMapper


def refusal(call: Callable[[], object], expected: type[Exception] | tuple[type[Exception], ...]) -> str | None:
    """None if ``call`` succeeds, its message if it raises ``expected``; anything else escapes (a bug)."""
    try:
        call()
    except expected as exc:
        return "\n".join(exc.lines()) if isinstance(exc, ConfigError) else str(exc)
    return None


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
trees = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
)

# Envelopes that look right at the top, with anything further down: reaches deep checks.
_KEYS = st.sampled_from(["ver", "kind", "site", "gw", "dev", "seq", "ts", "vals", "recs", "t", "v", "q", "u"])
envelopes = st.fixed_dictionaries(
    {
        "ver": st.just(1) | trees,
        "kind": st.sampled_from(["record", "batch"]) | trees,
        "site": st.just("s") | trees,
        "gw": st.just("g") | trees,
    },
    optional={
        "dev": st.just("d") | trees,
        "seq": st.integers(-5, 2**66) | trees,
        "ts": st.integers() | trees,
        "vals": st.dictionaries(st.text(max_size=5), st.dictionaries(_KEYS, trees, max_size=4), max_size=3) | trees,
        "recs": st.lists(st.dictionaries(_KEYS, trees, max_size=6), max_size=3) | trees,
    },
)


@FUZZ
@given(payload=st.binary(max_size=200))
def test_envelope_decoder_on_random_bytes(payload: bytes) -> None:
    assert refusal(lambda: decode(payload), WireError) != ""


@FUZZ
@given(envelope=envelopes, as_json=st.booleans())
def test_envelope_decoder_on_almost_right_envelopes(envelope: dict[str, Any], as_json: bool) -> None:
    try:
        payload = json.dumps(envelope).encode() if as_json else msgpack.packb(envelope)
    except (TypeError, ValueError, OverflowError):
        return  # not representable in that encoding: nothing to send
    assert refusal(lambda: decode(payload), WireError) != ""


@FUZZ
@given(body=trees | st.dictionaries(st.sampled_from(["id", "op", "tag", "value"]), trees, max_size=4))
def test_command_decoder(body: Any) -> None:
    try:
        payload = json.dumps(body).encode()
    except (TypeError, ValueError):
        return  # json.dumps refused (NaN keys and the like): nothing to send
    assert refusal(lambda: decode_command(payload), BadCommand) != ""


@FUZZ
@given(payload=st.binary(max_size=100))
def test_command_and_state_decoders_on_random_bytes(payload: bytes) -> None:
    assert refusal(lambda: decode_command(payload), BadCommand) != ""
    assert refusal(lambda: decode_state(payload), WireError) != ""


PARSERS = [
    KvParserConfig(kind="kv"),
    CsvParserConfig(kind="csv", columns=["a", "", "b"]),
    JsonParserConfig(kind="json"),
    RegexParserConfig(kind="regex", pattern=r"T=(?P<t>[-\d.]+)"),
    NmeaParserConfig(kind="nmea"),
    NmeaParserConfig(kind="nmea", checksum="optional"),
]


@pytest.mark.parametrize("config", PARSERS, ids=lambda c: f"{c.kind}")
def test_serial_parsers_and_mapping(config: Any) -> None:
    parser = build_parser(config)
    mapper = FieldMapper({}, keep_unlisted=True)

    @FUZZ
    @given(text=st.text(max_size=120) | st.from_regex(r"\$[A-Z]{5}(,[-\d.A-Z]*){0,12}(\*[0-9A-F]{2})?", fullmatch=True))
    def check(text: str) -> None:
        assert refusal(lambda: mapper.map(parser.parse(text)), FrameError) != ""  # a misfit value is just bad

    check()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.dictionaries(
        st.sampled_from(["gateway", "uplink", "buffer", "sources", "metrics", "logging", "colour"]),
        trees,
        max_size=4,
    )
)
def test_gateway_config_loader(tmp_path: Path, data: dict[str, Any]) -> None:
    path = tmp_path / "gateway.toml"
    lines = []
    for key, value in data.items():
        try:
            lines.append(f"{key} = {json.dumps(value)}")
        except (TypeError, ValueError):
            continue
    path.write_text("\n".join(lines))
    problems = refusal(lambda: load_gateway_config(path), ConfigError)
    assert problems != ""
    assert all(line.startswith(f"{path}: ") for line in (problems or "").splitlines())
