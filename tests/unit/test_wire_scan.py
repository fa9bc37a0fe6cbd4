"""The cloud's hot path reads batch envelopes straight from their bytes (BatchScanner) and
formats them with a template per record shape (LineFormatter). Both are shortcuts: side by
side with decode() and format_lines() they must give the same records and the same lines,
and whatever they do not recognise they must leave to decode(), never guess."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.stores.line_protocol import LineFormatter, LineMapping, format_lines, line_template
from fieldlink.wire import (
    BatchJoiner,
    BatchScanner,
    Encoding,
    Quality,
    Record,
    RecordShape,
    ScannedRecord,
    Value,
    ValueType,
    WireError,
    as_record,
    decode,
    encode_batch,
    encode_record,
)

SITE, GATEWAY = "plant-1", "gw-1"
TS = 1_700_000_000_000
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def values(seq: int) -> dict[str, Value]:
    return {
        "temperature": Value.of(20.5 + seq / 10, "degC"),
        "energy": Value.of(seq * 1000, "Wh"),
        "running": Value.of(seq % 2 == 0),
        "flow": Value.of(-0.0),
    }


def batch(seqs: range, devices: tuple[str, ...] = ("boiler-1", "pump-1"), **kwargs: dict[str, Value]) -> bytes:
    records = [
        Record(SITE, GATEWAY, device, seq, TS + seq, kwargs.get(device, values(seq)))
        for seq in seqs
        for device in devices
    ]
    return encode_batch(SITE, GATEWAY, records)


def learnt(*payloads: bytes) -> BatchScanner:
    scanner = BatchScanner()
    for payload in payloads:
        scanner.learn(payload, decode(payload))
    return scanner


def scanned(scanner: BatchScanner, payload: bytes) -> list[Record] | None:
    """The scanner's records as decode() returns them, or None; and the scan never disagrees with decode()."""
    result = scanner.scan(payload)
    if result is None:
        return None
    site, gateway, found = result
    records = [as_record(r) for r in found]
    assert records == decode(payload)
    assert all((r.site, r.gateway) == (site, gateway) for r in records)
    return records


def test_a_batch_of_known_shapes_is_read_without_decoding_and_equals_decode() -> None:
    scanner = learnt(batch(range(1, 3)))
    payload = batch(range(3, 50))  # other seqs, ts and values: the same shapes
    records = scanned(scanner, payload)
    assert records is not None
    assert len(records) == 94
    found = scanner.scan(payload)
    assert found is not None
    assert all(type(r) is ScannedRecord for r in found[2])
    first = found[2][0]
    assert (first.site, first.gateway, first.device, first.seq, first.ts) == (SITE, GATEWAY, "boiler-1", 3, TS + 3)


def test_nothing_is_recognised_before_it_was_learnt() -> None:
    payload = batch(range(1, 3))
    assert BatchScanner().scan(payload) is None
    assert scanned(learnt(payload), payload) is not None


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"boiler-1": {"temperature": Value.of(1.5, "K")}}, id="another unit"),
        pytest.param({"boiler-1": {"temperature": Value.of(1.5)}}, id="no unit"),
        pytest.param({"boiler-1": {"temperature": Value.of(2)}}, id="int instead of float"),
        pytest.param({"boiler-1": {"temperature": Value(None, "degC", Quality.BAD, ValueType.FLOAT)}}, id="bad"),
        pytest.param({"boiler-1": {"temperature": Value.of(math.nan, "degC")}}, id="nan"),
        pytest.param({"boiler-1": {"temperature": Value.of(-math.inf, "degC")}}, id="-inf"),
        pytest.param({"boiler-1": {"temperature": Value.of("21.5")}}, id="a string"),
        pytest.param({"boiler-1": {"count": Value.of(2**63)}}, id="beyond int64"),
        pytest.param({"boiler-1": {}}, id="no values"),
    ],
)
def test_a_record_unlike_what_was_learnt_is_left_to_decode(change: dict[str, dict[str, Value]]) -> None:
    scanner = learnt(batch(range(1, 2)), batch(range(1, 2), **{"boiler-1": {"count": Value.of(7)}}))
    assert scanned(scanner, batch(range(2, 4), **change)) is None


def test_a_new_device_is_left_to_decode_then_learnt() -> None:
    scanner = learnt(batch(range(1, 2)))
    payload = batch(range(2, 4), devices=("boiler-1", "fan-9"))
    assert scanned(scanner, payload) is None
    scanner.learn(payload, decode(payload))
    assert scanned(scanner, payload) is not None


def test_a_device_may_have_several_shapes() -> None:
    other = {"pump-1": {"speed": Value.of(1450, "rpm")}}
    scanner = learnt(batch(range(1, 2)), batch(range(1, 2), **other))
    assert scanned(scanner, batch(range(5, 7))) is not None
    assert scanned(scanner, batch(range(5, 7), **other)) is not None


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda p: p[:-1], id="cut short"),
        pytest.param(lambda p: p + b"\x00", id="trailing byte"),
        pytest.param(lambda p: p[:40], id="header only"),
        pytest.param(lambda p: p.replace(b"\xa3seq", b"\xa3sex", 1), id="renamed key"),
        pytest.param(lambda p: p.replace(b"\x85\xa3ver\x01", b"\x85\xa3ver\x02", 1), id="version 2"),
        pytest.param(lambda p: p.replace(b"\x85\xa3ver\x01", b"\x85\xa3ver\xc3", 1), id="version true"),
    ],
)
def test_damaged_payloads_are_left_to_decode(mangle: object) -> None:
    payload = batch(range(1, 3))
    scanner = learnt(payload)
    assert scanned(scanner, mangle(payload)) is None  # type: ignore[operator]


def test_other_envelopes_are_left_to_decode() -> None:
    payload = batch(range(1, 3))
    scanner = learnt(payload)
    records = decode(payload)
    assert scanner.scan(encode_batch(SITE, GATEWAY, records, Encoding.JSON)) is None
    assert scanner.scan(encode_record(records[0])) is None
    assert scanner.scan(encode_batch(SITE, "gw-2", [Record(SITE, "gw-2", "boiler-1", 1, TS, values(1))])) is None


def test_forgets_everything_past_max_shapes_and_learns_again() -> None:
    scanner = BatchScanner(max_shapes=3)
    first = batch(range(1, 2), devices=("a", "b", "c"))
    scanner.learn(first, decode(first))
    second = batch(range(1, 2), devices=("d",))
    scanner.learn(second, decode(second))
    assert scanned(scanner, batch(range(2, 3), devices=("d",))) is not None
    assert scanned(scanner, batch(range(2, 3), devices=("a",))) is None


def test_a_scanned_record_values_are_decoded_values() -> None:
    payload = batch(range(4, 5))
    found = learnt(payload).scan(payload)
    assert found is not None
    record = found[2][0].record()
    assert record.values["running"] == Value(True, None, Quality.GOOD, ValueType.BOOL)
    assert record.values["energy"] == Value(4000, "Wh", Quality.GOOD, ValueType.INT)
    assert math.copysign(1, record.values["flow"].value) == -1.0  # type: ignore[arg-type]


# --- byte-level fuzzing: mangled known payloads ------------------------------------------


@FUZZ
@given(st.data())
def test_whatever_the_scanner_accepts_decode_accepts_identically(data: st.DataObject) -> None:
    payload = bytearray(batch(range(1, 4)))
    scanner = learnt(bytes(payload))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(payload) - 1)))
        if action == "flip" and payload:
            payload[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del payload[at : at + data.draw(st.integers(1, 9))]
        else:
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=9))
    result = scanner.scan(bytes(payload))
    if result is not None:
        try:
            records = decode(bytes(payload))
        except WireError as exc:  # pragma: no cover (the assertion below says what went wrong)
            pytest.fail(f"scanned what decode() refuses: {exc}")
        assert [as_record(r) for r in result[2]] == records


# --- records of every kind: scanning and formatting agree with the reference ---------------

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)
units = st.none() | names
scannable = st.one_of(
    st.builds(Value.of, st.floats(allow_nan=False, allow_infinity=False), units),
    st.builds(Value.of, st.integers(-(2**63), 2**63 - 1), units),
    st.builds(Value.of, st.booleans(), units),
)
# Mostly values the scanner reads, sometimes one it must leave to decode().
good_values = st.one_of(
    scannable,
    scannable,
    scannable,
    st.builds(Value.of, st.floats() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=10), units),
    st.just(Value(None, "u", Quality.BAD, ValueType.FLOAT)),
)
device_names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="/+#\x00"), min_size=1, max_size=40
).filter(lambda s: not s.startswith("$"))
MAPPINGS = [
    LineMapping("fl_%d"),
    LineMapping("m x", tags=("device", "site")),
    LineMapping("m", units="field"),
    LineMapping("m", units="tag"),
    LineMapping("m", precision="s"),
]


@FUZZ
@given(st.lists(st.tuples(device_names, st.dictionaries(names, good_values, min_size=1, max_size=5)), max_size=5))
def test_scanned_records_and_their_lines_equal_the_reference(devices: list[tuple[str, dict[str, Value]]]) -> None:
    def envelope(seq: int) -> bytes:
        return encode_batch(SITE, GATEWAY, [Record(SITE, GATEWAY, d, seq, TS + seq, v) for d, v in devices])

    scanner = learnt(envelope(1))
    payload = envelope(2)
    records = decode(payload)
    result = scanner.scan(payload)
    if result is None:
        return  # left to decode(), which is always right
    found = result[2]
    assert [as_record(r) for r in found] == records
    for mapping in MAPPINGS:
        expected = ["\n".join(format_lines(r, mapping)) for r in records]
        assert LineFormatter(mapping).lines(found) == expected
        assert LineFormatter(mapping).lines(records) == expected


def test_the_bench_workload_is_scanned_and_formatted_like_the_reference() -> None:
    rng = random.Random(7)
    devices = [f"dev-{i}" for i in range(20)]

    def envelope(seq: int) -> bytes:
        records = [
            Record(
                SITE,
                GATEWAY,
                d,
                seq,
                TS + seq,
                {
                    "temperature": Value.of(rng.uniform(-50, 500), "degC"),
                    "energy": Value.of(rng.randrange(2**40), "Wh"),
                    "speed": Value.of(rng.randrange(-200, 200), "rpm"),
                    "running": Value.of(rng.random() < 0.5),
                },
            )
            for d in devices
        ]
        return encode_batch(SITE, GATEWAY, records)

    scanner = learnt(envelope(1))
    formatter = LineFormatter(LineMapping("fl_ingest"))
    for seq in range(2, 40):
        payload = envelope(seq)
        result = scanner.scan(payload)
        assert result is not None
        records = decode(payload)
        assert formatter.lines(result[2]) == [format_lines(r, formatter.mapping)[0] for r in records]


def test_percent_signs_in_names_are_not_format_specifiers() -> None:
    record = Record("50%", GATEWAY, "dev%s", 1, TS, {"%d%%": Value.of(1.5), "b": Value.of(True)})
    shape = RecordShape.of(record)
    assert shape is not None
    template = line_template(shape, LineMapping("m%"))
    assert template is not None
    assert template.text % (1.5, "true", TS) == format_lines(record, LineMapping("m%"))[0]


def test_shapes_only_of_good_scalar_values() -> None:
    assert RecordShape.of(Record(SITE, GATEWAY, "d", 1, TS, {})) is None
    assert RecordShape.of(Record(SITE, GATEWAY, "d", 1, TS, {"s": Value.of("x")})) is None
    bad = Value(None, None, Quality.BAD, ValueType.FLOAT)
    assert RecordShape.of(Record(SITE, GATEWAY, "d", 1, TS, {"v": bad})) is None
    assert RecordShape.of(Record(SITE, GATEWAY, "d", 1, TS, {"v": Value.of(1.0)})) is not None


def test_batches_joined_by_the_gateway_uplink_are_scanned() -> None:
    # The gateway's uplink joins stored record envelopes into batches without decoding them
    # (BatchJoiner): those are the bytes a cloud worker sees most.
    joiner = BatchJoiner(SITE, GATEWAY)

    def joined(seqs: range) -> bytes:
        records = [Record(SITE, GATEWAY, d, s, TS + s, values(s)) for s in seqs for d in ("boiler-1", "pump-1")]
        return joiner.join([joiner.body(encode_record(r)) for r in records])

    scanner = learnt(joined(range(1, 2)))
    assert scanned(scanner, joined(range(2, 30))) is not None
    assert scanned(scanner, joined(range(30, 31))) is not None  # fewer than 16 records: a fixarray
