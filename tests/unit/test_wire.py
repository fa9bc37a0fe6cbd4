"""The wire contract: envelopes round trip in both encodings, rejections name the problem, topics parse."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldlink.wire import (
    BATCH_FILTER,
    TELEMETRY_FILTER,
    BatchJoiner,
    Encoding,
    Quality,
    Record,
    Topic,
    TopicKind,
    Value,
    ValueType,
    WireError,
    check_topic_level,
    decode,
    decode_state,
    encode_batch,
    encode_record,
    encode_state,
    topic,
)

I64_MIN = -(2**63)
U64_MAX = 2**64 - 1

# --- strategies -------------------------------------------------------------------------


def _is_topic_level(name: str) -> bool:
    try:
        check_topic_level(name)
    except ValueError:
        return False
    return True


names = st.text(min_size=1, max_size=12).filter(_is_topic_level)
units = st.none() | st.sampled_from(["degC", "kWh", "m³/h", "%"]) | st.text(min_size=1, max_size=6)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, float("nan"), float("inf")])
ints = st.integers(min_value=I64_MIN, max_value=U64_MAX) | st.sampled_from([I64_MIN, U64_MAX, 2**63 - 1, 0, -1])
typed_scalars = st.one_of(
    st.tuples(st.just(ValueType.BOOL), st.booleans()),
    st.tuples(st.just(ValueType.INT), ints),
    st.tuples(st.just(ValueType.FLOAT), floats),
    st.tuples(st.just(ValueType.STRING), st.text(max_size=20)),
)


@st.composite
def values(draw: st.DrawFn) -> Value:
    kind, scalar = draw(typed_scalars)
    quality = draw(st.sampled_from(list(Quality)))
    if quality is not Quality.GOOD and draw(st.booleans()):
        scalar = None  # only a value that is not good may be null
    return Value(scalar, draw(units), quality, kind)


@st.composite
def records(draw: st.DrawFn, site: str | None = None, gateway: str | None = None) -> Record:
    return Record(
        site=site if site is not None else draw(names),
        gateway=gateway if gateway is not None else draw(names),
        device=draw(names),
        seq=draw(st.integers(min_value=0, max_value=U64_MAX)),
        ts=draw(st.integers(min_value=0, max_value=2**63 - 1)),
        values=draw(st.dictionaries(st.text(min_size=1, max_size=10), values(), max_size=5)),
    )


@st.composite
def batches(draw: st.DrawFn) -> tuple[str, str, list[Record]]:
    site, gateway = draw(names), draw(names)
    return site, gateway, draw(st.lists(records(site, gateway), max_size=5))


def comparable(record: Record) -> tuple[Any, ...]:
    """A record as plain data where NaN equals NaN, -0.0 differs from 0.0 and 1 differs from True."""

    def scalar(v: Any) -> tuple[str, str]:
        return (type(v).__name__, repr(v))

    vals = {name: (scalar(v.value), v.unit, v.quality, v.type) for name, v in record.values.items()}
    return (record.site, record.gateway, record.device, record.seq, record.ts, vals)


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", list(Encoding))
@settings(max_examples=150, deadline=None)
@given(record=records())
def test_record_envelope_round_trips(encoding: Encoding, record: Record) -> None:
    decoded = decode(encode_record(record, encoding))
    assert [comparable(r) for r in decoded] == [comparable(record)]


@pytest.mark.parametrize("encoding", list(Encoding))
@settings(max_examples=75, deadline=None)
@given(batch=batches())
def test_batch_envelope_round_trips(encoding: Encoding, batch: tuple[str, str, list[Record]]) -> None:
    site, gateway, recs = batch
    decoded = decode(encode_batch(site, gateway, recs, encoding))
    assert [comparable(r) for r in decoded] == [comparable(r) for r in recs]


@pytest.mark.parametrize("encoding", list(Encoding))
def test_special_values_round_trip_exactly(encoding: Encoding) -> None:
    record = Record(
        "plant-1",
        "gw-1",
        "boiler-1",
        U64_MAX,
        1_700_000_000_123,
        {
            "nan": Value.of(float("nan")),
            "inf": Value.of(float("inf")),
            "-inf": Value.of(float("-inf")),
            "negzero": Value.of(-0.0),
            "integral": Value.of(3.0, "bar"),
            "min": Value.of(I64_MIN),
            "max": Value.of(U64_MAX),
            "flag": Value.of(True),
            "text": Value.of("Störung: Überdruck ☢"),
            "lost": Value(None, "degC", Quality.BAD, ValueType.FLOAT),
            "guess": Value(7, None, Quality.UNCERTAIN, ValueType.INT),
        },
    )
    (back,) = decode(encode_record(record, encoding))
    assert comparable(back) == comparable(record)
    assert type(back.values["integral"].value) is float
    assert type(back.values["flag"].value) is bool


# --- telling the encodings apart -------------------------------------------------------


def _sample_record() -> Record:
    return Record("s", "g", "d", 5, 1000, {"t": Value.of(21.5, "degC")})


def test_json_starts_with_brace_and_msgpack_never_does() -> None:
    record = _sample_record()
    as_json = encode_record(record, Encoding.JSON)
    as_msgpack = encode_record(record, Encoding.MSGPACK)
    assert as_json[:1] == b"{"
    assert json.loads(as_json)["kind"] == "record"
    assert as_msgpack[:1] != b"{"
    assert msgpack.unpackb(as_msgpack)["kind"] == "record"
    assert decode(as_json) == decode(as_msgpack) == [record]


def test_decode_picks_the_decoder_by_the_first_byte() -> None:
    as_json = encode_record(_sample_record(), Encoding.JSON)
    # The same JSON after one leading space is read as msgpack (0x20 is the integer 32): rejected.
    with pytest.raises(WireError, match="undecodable payload"):
        decode(b" " + as_json)
    # A msgpack map whose bytes happen to contain '{' later is still msgpack.
    record = Record("s", "g", "{dev", 1, 2, {"{": Value.of("{")})
    assert decode(encode_record(record, Encoding.MSGPACK)) == [record]


# --- rejections -------------------------------------------------------------------------


def _envelope(**changes: Any) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "ver": 1,
        "kind": "record",
        "site": "plant-1",
        "gw": "gw-1",
        "dev": "boiler-1",
        "seq": 7,
        "ts": 1_700_000_000_000,
        "vals": {"temp": {"t": "float", "v": 21.5, "u": "degC"}},
    }
    for key, value in changes.items():
        if value is _MISSING:
            del envelope[key]
        else:
            envelope[key] = value
    return envelope


_MISSING = object()


def _pack(envelope: Any, encoding: Encoding) -> bytes:
    if encoding is Encoding.JSON:
        return json.dumps(envelope).encode()
    return msgpack.packb(envelope, use_bin_type=True)


def test_the_reference_envelope_is_accepted() -> None:
    for encoding in Encoding:
        (record,) = decode(_pack(_envelope(), encoding))
        assert record == Record("plant-1", "gw-1", "boiler-1", 7, 1_700_000_000_000, {"temp": Value.of(21.5, "degC")})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        pytest.param(b"", "empty payload", id="empty"),
        pytest.param(b"\xc1\x00\x01", "undecodable payload", id="garbage-msgpack"),
        pytest.param(b"\xff\xfe\xfd", "undecodable payload", id="garbage-trailing-bytes"),
        pytest.param(b'{"ver": 1, "kind"', "undecodable payload", id="truncated-json"),
        pytest.param(b'{"ver": 1, \xff}', "undecodable payload", id="json-not-utf8"),
        pytest.param(b'[{"ver": 1}]', "undecodable payload", id="json-array"),
        pytest.param(msgpack.packb([1, 2, 3]), "envelope is not a map", id="msgpack-array"),
        pytest.param(msgpack.packb(42), "envelope is not a map", id="msgpack-int"),
    ],
)
def test_undecodable_payloads_are_rejected(payload: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode(payload)


_VALUE_CASES = [
    pytest.param({"t": "int", "v": "12"}, "value '12' is not of type int", id="int-tag-str-value"),
    pytest.param({"t": "int", "v": 1.5}, "value 1.5 is not of type int", id="int-tag-float-value"),
    pytest.param({"t": "int", "v": True}, "value True is not of type int", id="int-tag-bool-value"),
    pytest.param({"t": "bool", "v": 1}, "value 1 is not of type bool", id="bool-tag-int-value"),
    pytest.param({"t": "float", "v": True}, "value True is not of type float", id="float-tag-bool-value"),
    pytest.param({"t": "float", "v": "1.5"}, "value '1.5' is not of type float", id="float-tag-str-value"),
    pytest.param({"t": "str", "v": 5}, "value 5 is not of type str", id="str-tag-int-value"),
    pytest.param({"t": "float", "v": None}, "a good value must not be null", id="good-null"),
    pytest.param({"t": "float"}, "a good value must not be null", id="good-missing-v"),
    pytest.param({"t": "float", "v": 1.0, "q": "meh"}, "unknown quality 'meh'", id="unknown-quality"),
    pytest.param({"t": "decimal", "v": 1.0}, "unknown value type 'decimal'", id="unknown-type-tag"),
    pytest.param({"t": "float", "v": 1.0, "u": 5}, "unit is not a string", id="unit-not-str"),
    pytest.param([1.0], "value entry is not a map", id="entry-not-map"),
]


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"ver": 2}, "unsupported envelope version 2 \\(this side speaks 1\\)", id="ver-2"),
        pytest.param({"ver": _MISSING}, "unsupported envelope version None", id="ver-missing"),
        pytest.param({"ver": "1"}, "unsupported envelope version '1'", id="ver-str"),
        pytest.param({"kind": "recs"}, "unknown envelope kind 'recs'", id="kind-unknown"),
        pytest.param({"kind": _MISSING}, "unknown envelope kind None", id="kind-missing"),
        pytest.param({"seq": _MISSING}, "record: missing 'seq'", id="seq-missing"),
        pytest.param({"seq": True}, "record: 'seq' has the wrong type \\(bool\\)", id="seq-bool"),
        pytest.param({"seq": "7"}, "record: 'seq' has the wrong type \\(str\\)", id="seq-str"),
        pytest.param({"seq": -1}, "record: seq out of range", id="seq-negative"),
        pytest.param({"ts": 1.5}, "record: 'ts' has the wrong type \\(float\\)", id="ts-float"),
        pytest.param({"site": "plant/1"}, "envelope: 'site' must not contain '/'", id="site-slash"),
        pytest.param({"site": "+"}, "envelope: 'site' must not contain '\\+'", id="site-plus"),
        pytest.param({"site": ""}, "envelope: 'site' must not be empty", id="site-empty"),
        pytest.param({"gw": "$SYS"}, "envelope: 'gw' must not start with '\\$'", id="gw-dollar"),
        pytest.param({"gw": 5}, "envelope: 'gw' has the wrong type \\(int\\)", id="gw-int"),
        pytest.param({"dev": "a#b"}, "record: 'dev' must not contain '#'", id="dev-hash"),
        pytest.param({"vals": [1]}, "record: 'vals' has the wrong type \\(list\\)", id="vals-list"),
        pytest.param({"vals": {"": {"t": "int", "v": 1}}}, "value names must be non-empty", id="vals-empty-name"),
        *[
            pytest.param({"vals": {"temp": entry}}, "record.vals.temp: " + message, id=p.id)
            for p in _VALUE_CASES
            for entry, message in [p.values]
        ],
    ],
)
def test_bad_record_envelopes_are_rejected_with_the_reason(
    changes: dict[str, Any], message: str, encoding: Encoding
) -> None:
    with pytest.raises(WireError, match=message):
        decode(_pack(_envelope(**changes), encoding))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vals": {"n": {"t": "int", "v": U64_MAX + 1}}}, "record.vals.n: integer out of 64-bit range"),
        ({"vals": {"n": {"t": "int", "v": I64_MIN - 1}}}, "record.vals.n: integer out of 64-bit range"),
        ({"seq": U64_MAX + 1}, "record: seq out of range"),
    ],
)
def test_numbers_beyond_64_bits_are_rejected(changes: dict[str, Any], message: str) -> None:
    # msgpack cannot even carry them; JSON can, so the decoder checks the range.
    with pytest.raises(WireError, match=message):
        decode(_pack(_envelope(**changes), Encoding.JSON))


def test_a_bad_record_in_a_batch_is_named_by_its_index() -> None:
    good = {"dev": "d", "seq": 1, "ts": 1, "vals": {}}
    envelope = {"ver": 1, "kind": "batch", "site": "s", "gw": "g", "recs": [good, {**good, "seq": "x"}]}
    with pytest.raises(WireError, match=r"batch.recs\[1\]: 'seq' has the wrong type"):
        decode(_pack(envelope, Encoding.MSGPACK))
    with pytest.raises(WireError, match=r"batch: 'recs' has the wrong type \(dict\)"):
        decode(_pack({**envelope, "recs": {"a": good}}, Encoding.JSON))
    with pytest.raises(WireError, match=r"batch.recs\[0\]: record is not a map"):
        decode(_pack({**envelope, "recs": [5]}, Encoding.JSON))


@pytest.mark.parametrize("encoding", list(Encoding))
def test_value_without_type_tag_is_a_wire_error(encoding: Encoding) -> None:
    # Regression: this used to escape as KeyError, which the cloud's ingest does not catch.
    with pytest.raises(WireError, match=r"record\.vals\.temp: missing 't'"):
        decode(_pack(_envelope(vals={"temp": {"v": 1.0}}), encoding))


def test_deeply_nested_json_is_a_wire_error() -> None:
    # Regression: this used to escape as RecursionError.
    depth = 100_000
    payload = b'{"ver":' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(WireError, match="undecodable payload"):
        decode(payload)


def test_deeply_nested_msgpack_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="undecodable payload"):
        decode(b"\x81\xa3ver" + b"\x91" * 100_000 + b"\x00")


@pytest.mark.parametrize("encoding", list(Encoding))
def test_boolean_version_is_rejected(encoding: Encoding) -> None:
    # Regression: True == 1 in Python, so 'ver': true used to pass the version check.
    with pytest.raises(WireError, match="unsupported envelope version True"):
        decode(_pack(_envelope(ver=True), encoding))


# --- topics -----------------------------------------------------------------------------

_GATEWAY_KINDS = [TopicKind.GATEWAY_STATUS, TopicKind.GATEWAY_HEALTH, TopicKind.BATCH]
_DEVICE_KINDS = [TopicKind.TELEMETRY, TopicKind.DEVICE_STATUS, TopicKind.COMMAND, TopicKind.COMMAND_RESULT]


def test_every_topic_kind_is_either_a_gateway_or_a_device_topic() -> None:
    assert sorted(_GATEWAY_KINDS + _DEVICE_KINDS) == sorted(TopicKind)


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from(list(TopicKind)), site=names, gateway=names, device=names)
def test_topic_round_trips(kind: TopicKind, site: str, gateway: str, device: str) -> None:
    parts = Topic(kind, site, gateway, device if kind in _DEVICE_KINDS else None)
    name = str(parts)
    assert Topic.parse(name) == parts
    assert topic(parts.kind, parts.site, parts.gateway, parts.device) == name


@pytest.mark.parametrize(
    ("kind", "device", "expected"),
    [
        (TopicKind.GATEWAY_STATUS, None, "fl/plant-1/gw-1/status"),
        (TopicKind.GATEWAY_HEALTH, None, "fl/plant-1/gw-1/health"),
        (TopicKind.BATCH, None, "fl/plant-1/gw-1/batch"),
        (TopicKind.TELEMETRY, "boiler-1", "fl/plant-1/gw-1/dev/boiler-1/telemetry"),
        (TopicKind.DEVICE_STATUS, "boiler-1", "fl/plant-1/gw-1/dev/boiler-1/status"),
        (TopicKind.COMMAND, "boiler-1", "fl/plant-1/gw-1/dev/boiler-1/cmd"),
        (TopicKind.COMMAND_RESULT, "boiler-1", "fl/plant-1/gw-1/dev/boiler-1/cmd/result"),
    ],
)
def test_topic_names(kind: TopicKind, device: str | None, expected: str) -> None:
    assert topic(kind, "plant-1", "gw-1", device) == expected
    assert Topic.parse(expected) == Topic(kind, "plant-1", "gw-1", device)


def test_subscription_filters_match_the_tree() -> None:
    assert TELEMETRY_FILTER == "fl/+/+/dev/+/telemetry"
    assert BATCH_FILTER == "fl/+/+/batch"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "fl",
        "fl/s/g",
        "xx/s/g/status",
        "FL/s/g/status",
        "/fl/s/g/status",
        "fl/s/g/unknown",
        "fl/s/g/status/extra",
        "fl/s/g/dev/d",
        "fl/s/g/dev/d/unknown",
        "fl/s/g/dev/d/cmd/other",
        "fl/s/g/dev/d/telemetry/extra",
        "fl/s/g/device/d/telemetry",
    ],
)
def test_names_outside_the_tree_are_rejected(name: str) -> None:
    with pytest.raises(WireError, match="topic"):
        Topic.parse(name)


# --- batches of one gateway ---------------------------------------------------------------


def test_encode_batch_refuses_a_record_of_another_gateway() -> None:
    mine = Record("plant-1", "gw-1", "d", 1, 1, {})
    other_gateway = Record("plant-1", "gw-2", "d", 1, 1, {})
    other_site = Record("plant-2", "gw-1", "d", 1, 1, {})
    with pytest.raises(WireError, match="record of plant-1/gw-2 in a batch of plant-1/gw-1"):
        encode_batch("plant-1", "gw-1", [mine, other_gateway])
    with pytest.raises(WireError, match="record of plant-2/gw-1 in a batch of plant-1/gw-1"):
        encode_batch("plant-1", "gw-1", [mine, other_site], Encoding.JSON)
    assert decode(encode_batch("plant-1", "gw-1", [mine, mine])) == [mine, mine]


def test_an_empty_batch_decodes_to_no_records() -> None:
    for encoding in Encoding:
        assert decode(encode_batch("s", "g", [], encoding)) == []


# --- state payloads ---------------------------------------------------------------------


def test_state_round_trips_with_reason_and_extras() -> None:
    payload = encode_state("offline", 1_700_000_000_000, "timeout", source="bus-1", failures=3)
    assert json.loads(payload) == {
        "state": "offline",
        "ts": 1_700_000_000_000,
        "reason": "timeout",
        "source": "bus-1",
        "failures": 3,
    }
    assert decode_state(payload) == json.loads(payload)


def test_state_without_reason_leaves_it_out() -> None:
    assert decode_state(encode_state("online", 5)) == {"state": "online", "ts": 5}
    assert decode_state(encode_state("online", 5, "")) == {"state": "online", "ts": 5}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "state payload is not JSON"),
        (b"online", "state payload is not JSON"),
        (b"\xff\xfe", "state payload is not JSON"),
        (b"[]", "state payload has no 'state'"),
        (b'{"ts": 1}', "state payload has no 'state'"),
        (b'{"state": 1}', "state payload has no 'state'"),
    ],
)
def test_bad_state_payloads_are_rejected(payload: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_state(payload)


# --- batch joining (the uplink's replay path) ------------------------------------------


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("count", [1, 15, 16, 300])
def test_joined_batch_decodes_to_the_same_records(encoding: Encoding, count: int) -> None:
    joiner = BatchJoiner("plant-ü", "gw-1", encoding)
    records = [
        Record(
            "plant-ü",
            "gw-1",
            f"dev-{i % 3}",
            i + 1,
            1_700_000_000_000 + i,
            {"t": Value.of(20.5 + i, "°C"), "n": Value.of(i), "ok": Value(None, None, Quality.BAD, ValueType.BOOL)},
        )
        for i in range(count)
    ]
    payload = joiner.join([joiner.body(encode_record(r, encoding)) for r in records])
    assert decode(payload) == records
    assert joiner.reencoded == 0  # the fast path: bytes sliced, nothing decoded


def test_joiner_reencodes_records_of_the_other_encoding() -> None:
    # A backlog written before the uplink's encoding was changed holds the old encoding.
    joiner = BatchJoiner("plant-1", "gw-1", Encoding.MSGPACK)
    old = Record("plant-1", "gw-1", "a", 1, 1, {"x": Value.of(1.0)})
    new = Record("plant-1", "gw-1", "a", 2, 2, {"x": Value.of(2.0)})
    bodies = [joiner.body(encode_record(old, Encoding.JSON)), joiner.body(encode_record(new, Encoding.MSGPACK))]
    assert decode(joiner.join(bodies)) == [old, new]
    assert joiner.reencoded == 1


def test_joiner_refuses_records_of_another_gateway() -> None:
    joiner = BatchJoiner("plant-1", "gw-1")
    stranger = Record("plant-1", "gw-2", "a", 1, 1, {"x": Value.of(1.0)})
    with pytest.raises(WireError, match="gw-2"):
        joiner.body(encode_record(stranger))
