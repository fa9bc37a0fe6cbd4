"""Tag maps beyond plain registers: gaps, bit tables, bits of registers, strings, 1-based addresses, reporting."""

from __future__ import annotations

import struct

import pytest
from pydantic import ValidationError

from fieldlink.wire import Quality, Value, ValueType
from gateway.sources.base import CommandError
from gateway.sources.modbus.codec import ByteOrder, RegisterType, encode_registers
from gateway.sources.modbus.config import RegisterConfig
from gateway.sources.modbus.decode import tag_value
from gateway.sources.modbus.plan import ReadBlock, plan_reads
from gateway.sources.modbus.report import ReportFilter
from gateway.sources.modbus.source import _encode_tag


def tag(
    name: str, address: int, kind: str | None = "uint16", table: str = "holding", **options: object
) -> RegisterConfig:
    raw = {"name": name, "address": address, "table": table, **options}
    if kind is not None:
        raw["type"] = kind
    return RegisterConfig.model_validate(raw)


def spans(blocks: list[ReadBlock]) -> list[tuple[str, int, int, list[str]]]:
    return [(b.table, b.start, b.count, [t.name for t in b.tags]) for b in blocks]


def test_max_gap_merges_nearby_tags_and_no_further() -> None:
    registers = [tag("a", 0), tag("b", 5), tag("c", 20)]
    assert spans(plan_reads(registers, max_gap=4)) == [("holding", 0, 6, ["a", "b"]), ("holding", 20, 1, ["c"])]
    assert spans(plan_reads(registers, max_gap=3)) == [
        ("holding", 0, 1, ["a"]),
        ("holding", 5, 1, ["b"]),
        ("holding", 20, 1, ["c"]),
    ]
    assert len(plan_reads(registers, max_gap=14)) == 1


def test_offsets_locate_each_tag_in_its_block() -> None:
    (block,) = plan_reads([tag("a", 10), tag("f", 13, "float32")], max_gap=2)
    assert (block.start, block.count, block.offsets) == (10, 5, (0, 3))


def test_address_base_one_shifts_to_wire_addresses() -> None:
    (block,) = plan_reads([tag("a", 1), tag("b", 2)], address_base=1)
    assert (block.start, block.count) == (0, 2)


def test_coils_and_discrete_inputs_are_read_apart_with_the_bit_limit() -> None:
    registers = [
        tag("c0", 0, None, "coil"),
        tag("c1", 1, "bool", "coil"),
        tag("d0", 0, None, "discrete_input"),
        tag("far", 1999, None, "coil"),
        tag("h", 0),
    ]
    assert spans(plan_reads(registers, max_count=10, max_gap=2000)) == [
        ("coil", 0, 2000, ["c0", "c1", "far"]),
        ("discrete_input", 0, 1, ["d0"]),
        ("holding", 0, 1, ["h"]),
    ]


def test_bits_of_one_register_share_its_read() -> None:
    registers = [tag("run", 7, "bool", bit=0), tag("alarm", 7, "bool", bit=15), tag("speed", 8)]
    (block,) = plan_reads(registers)
    assert (block.start, block.count) == (7, 2)
    words = [0x8001, 42]
    values = {
        t.name: tag_value(t, words[o : o + t.width], ByteOrder.ABCD)
        for t, o in zip(block.tags, block.offsets, strict=True)
    }
    assert values == {
        "run": Value(True, None, Quality.GOOD, ValueType.BOOL),
        "alarm": Value(True, None, Quality.GOOD, ValueType.BOOL),
        "speed": Value(42, None, Quality.GOOD, ValueType.INT),
    }
    assert tag_value(registers[0], [0x8000], ByteOrder.ABCD).value is False


def test_string_tag_spans_its_length() -> None:
    name = tag("serial", 100, "string", length=4)
    assert name.width == 4
    assert tag_value(name, [0x4142, 0x4344, 0, 0], ByteOrder.ABCD) == Value(
        "ABCD", None, Quality.GOOD, ValueType.STRING
    )
    assert tag_value(name, [0x4241, 0x4443, 0, 0], ByteOrder.BADC).value == "ABCD"


@pytest.mark.parametrize("text", ["231.7", "0.1", "-1.5e-05", "3.4028235e+38", "1.401298e-45", "16777217"])
def test_float32_reads_as_a_decimal_of_its_own_precision(text: str) -> None:
    words = encode_registers(float(text), RegisterType.FLOAT32, ByteOrder.ABCD)
    value = tag_value(tag("t", 0, "float32"), words, ByteOrder.ABCD).value
    assert isinstance(value, float)
    assert encode_registers(value, RegisterType.FLOAT32, ByteOrder.ABCD) == words
    assert len(repr(value)) <= len(repr(struct.unpack(">f", struct.pack(">f", float(text)))[0]))
    if text != "16777217":  # not a float32: it reads as its nearest, 16777216
        assert value == float(text)


def test_nan_in_a_float_register_is_a_bad_value() -> None:
    value = tag_value(tag("t", 0, "float32"), [0x7FC0, 0], ByteOrder.ABCD)
    assert value.quality is Quality.BAD
    assert value.value is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"type": "uint16", "table": "coil"}, "type must be bool"),
        ({"table": "holding"}, "type is required"),
        ({"type": "bool"}, "needs `bit`"),
        ({"type": "uint16", "bit": 3}, "type must be bool"),
        ({"type": "string"}, "length"),
        ({"type": "uint16", "length": 2}, "length"),
        ({"type": "bool", "bit": 1, "scale": 2}, "scale and offset apply to numbers"),
        ({"type": "uint16", "deadband": 1}, 'deadband applies to report = "change"'),
        ({"type": "string", "length": 2, "report": "change", "deadband": 1}, "deadband applies to numbers"),
        ({"type": "uint16", "min_interval": "10s", "max_interval": "5s"}, "min_interval"),
        ({"type": "uint16", "table": "input", "writable": True}, "cannot be written"),
        ({"type": "uint16", "poll_interval": "1s", "group": "fast"}, "not both"),
        ({"type": "uint16", "scale": 0}, "scale must not be 0"),
    ],
)
def test_inconsistent_tags_are_refused(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RegisterConfig.model_validate({"name": "t", "address": 0, **raw})


# --- report strategies ----------------------------------------------------------------------


def good(value: float) -> Value:
    return Value(value, None, Quality.GOOD, ValueType.FLOAT)


def offered(report_filter: ReportFilter, series: list[tuple[float, Value]]) -> list[float]:
    return [t for t, v in series if report_filter.offer(v, t)]


def test_every_poll_is_the_default() -> None:
    f = ReportFilter(tag("t", 0, "float32"))
    assert offered(f, [(0, good(1)), (1, good(1)), (2, good(1))]) == [0, 1, 2]


def test_change_with_absolute_deadband_compares_with_the_last_sent_value() -> None:
    f = ReportFilter(tag("t", 0, "float32", report="change", deadband=0.5))
    series = [(0, good(10)), (1, good(10.3)), (2, good(10.6)), (3, good(10.9)), (4, good(11.2)), (5, good(11.2))]
    # 10.6 moved 0.6 from 10 (sent); 11.2 moved 0.6 from 10.6 (sent); drift adds up.
    assert offered(f, series) == [0, 2, 4]


def test_percent_deadband() -> None:
    f = ReportFilter(tag("t", 0, "float32", report="change", deadband_percent=10))
    assert offered(f, [(0, good(100)), (1, good(109)), (2, good(111)), (3, good(100.5)), (4, good(99))]) == [0, 2, 4]


def test_change_without_deadband_reports_any_change() -> None:
    f = ReportFilter(tag("t", 0, "uint16", report="change"))
    ints = [(t, Value(v, None, Quality.GOOD, ValueType.INT)) for t, v in [(0, 1), (1, 1), (2, 2), (3, 2)]]
    assert offered(f, ints) == [0, 2]


def test_heartbeat_sends_unchanged_values() -> None:
    f = ReportFilter(tag("t", 0, "float32", report="change", max_interval="10s"))
    assert offered(f, [(t, good(5)) for t in range(0, 25)]) == [0, 10, 20]


def test_min_interval_holds_back_then_sends_the_latest() -> None:
    f = ReportFilter(tag("t", 0, "float32", report="change", min_interval="5s"))
    series = [(0, good(1)), (1, good(2)), (2, good(3)), (5, good(3)), (6, good(3))]
    assert offered(f, series) == [0, 5]


def test_quality_change_is_always_sent() -> None:
    f = ReportFilter(tag("t", 0, "float32", report="change", deadband=100, min_interval="1h"))
    bad = Value(None, None, Quality.BAD, ValueType.FLOAT)
    assert offered(f, [(0, good(1)), (1, bad), (2, bad), (3, good(1))]) == [0, 1, 3]


def test_reset_sends_the_next_value() -> None:
    f = ReportFilter(tag("t", 0, "float32", report="change"))
    assert f.offer(good(1), 0)
    assert not f.offer(good(1), 1)
    f.reset()
    assert f.offer(good(1), 2)


# --- write encoding ---------------------------------------------------------------------------


def test_writes_use_the_inverse_of_scale_and_offset() -> None:
    setpoint = tag("sp", 0, "int16", scale=0.1, offset=-40, writable=True)
    assert _encode_tag(setpoint, 25.3, ByteOrder.ABCD) == [653]
    assert tag_value(setpoint, [653], ByteOrder.ABCD).value == 25.3


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("uint16", -1, "outside the range"),
        ("uint16", 1.5, "not a whole number"),
        ("uint16", "7", "expected a number"),
        ("uint16", True, "expected a number"),
        ("float32", None, "expected a number"),
        ("float32", float("inf"), "expected a finite number"),
        ("int16", float("nan"), "expected a finite number"),
    ],
)
def test_bad_write_values_are_refused_with_a_reason(kind: str, value: object, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        _encode_tag(tag("t", 0, kind, writable=True), value, ByteOrder.ABCD)


def test_a_huge_integer_for_a_scaled_tag_is_refused_not_raised() -> None:
    with pytest.raises(CommandError, match="cannot be written as int16"):
        _encode_tag(tag("t", 0, "int16", scale=0.1, writable=True), 10**400, ByteOrder.ABCD)
