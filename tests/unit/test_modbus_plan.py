"""Register maps to as few Modbus reads as possible, and register words to typed values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fieldlink.wire import Quality, Value, ValueType
from gateway.sources.modbus.codec import ByteOrder, RegisterType, encode_registers
from gateway.sources.modbus.config import MAX_REGISTERS_PER_READ, ModbusTcpConfig, RegisterConfig
from gateway.sources.modbus.decode import tag_value
from gateway.sources.modbus.plan import ReadBlock, plan_reads


def tag(name: str, address: int, kind: str = "uint16", table: str = "holding", **options: object) -> RegisterConfig:
    return RegisterConfig.model_validate({"name": name, "address": address, "type": kind, "table": table, **options})


def spans(blocks: list[ReadBlock]) -> list[tuple[str, int, int, list[str]]]:
    return [(b.table, b.start, b.count, [t.name for t in b.tags]) for b in blocks]


def assert_every_tag_served_once(registers: list[RegisterConfig], blocks: list[ReadBlock]) -> None:
    served = [t.name for b in blocks for t in b.tags]
    assert sorted(served) == sorted(r.name for r in registers)
    for block in blocks:
        assert 1 <= block.count <= MAX_REGISTERS_PER_READ
        for t in block.tags:
            assert t.table == block.table
            assert block.start <= t.address
            assert t.address + t.width <= block.start + block.count


# --- plan_reads ---------------------------------------------------------------------------


def test_contiguous_registers_merge_into_one_read() -> None:
    registers = [tag("a", 10), tag("b", 11, "float32"), tag("c", 13, "int32"), tag("d", 15, "int16")]
    blocks = plan_reads(registers)
    assert spans(blocks) == [("holding", 10, 6, ["a", "b", "c", "d"])]


def test_tags_are_sorted_by_address_first() -> None:
    registers = [tag("late", 12), tag("early", 10, "float32")]
    assert spans(plan_reads(registers)) == [("holding", 10, 3, ["early", "late"])]


def test_a_gap_splits_reads() -> None:
    registers = [tag("a", 0, "float32"), tag("b", 3), tag("c", 4)]  # register 2 is nobody's
    blocks = plan_reads(registers)
    assert spans(blocks) == [("holding", 0, 2, ["a"]), ("holding", 3, 2, ["b", "c"])]
    assert_every_tag_served_once(registers, blocks)


def test_holding_and_input_registers_never_share_a_read() -> None:
    registers = [tag("h1", 0), tag("i1", 1, table="input"), tag("h2", 1), tag("i2", 2, "float32", table="input")]
    blocks = plan_reads(registers)
    assert spans(blocks) == [("holding", 0, 2, ["h1", "h2"]), ("input", 1, 3, ["i1", "i2"])]
    assert_every_tag_served_once(registers, blocks)


def test_the_register_limit_splits_a_long_map() -> None:
    registers = [tag(f"f{i}", i * 2, "float32") for i in range(70)]  # 140 registers in a row
    blocks = plan_reads(registers)
    assert len(blocks) == 2
    assert all(b.count <= 125 for b in blocks)
    assert spans(blocks)[0][:3] == ("holding", 0, 124)  # 62 floats; a 63rd would need 126
    assert spans(blocks)[1][:3] == ("holding", 124, 16)
    assert_every_tag_served_once(registers, blocks)


def test_a_read_of_exactly_the_limit_is_one_read() -> None:
    registers = [tag(f"u{i}", i) for i in range(125)]
    assert spans(plan_reads(registers))[0][:3] == ("holding", 0, 125)
    assert len(plan_reads([*registers, tag("one-more", 125)])) == 2


def test_a_smaller_limit_is_honoured() -> None:
    registers = [tag(f"u{i}", i) for i in range(10)]
    blocks = plan_reads(registers, max_count=4)
    assert [(b.start, b.count) for b in blocks] == [(0, 4), (4, 4), (8, 2)]


def test_overlapping_tags_are_served_from_one_read() -> None:
    registers = [tag("power", 100, "float32"), tag("power_hi", 100), tag("power_lo", 101)]
    blocks = plan_reads(registers)
    assert len(blocks) == 1
    assert (blocks[0].start, blocks[0].count) == (100, 2)
    assert_every_tag_served_once(registers, blocks)


def test_a_tag_inside_an_earlier_span_does_not_shrink_it() -> None:
    registers = [tag("wide", 0, "uint32"), tag("inner", 0), tag("next", 2)]
    assert spans(plan_reads(registers)) == [("holding", 0, 3, ["wide", "inner", "next"])]


def test_no_registers_means_no_reads() -> None:
    assert plan_reads([]) == []


def _tag_value(register: RegisterConfig, words: list[int]) -> Value:
    return tag_value(register, words, register.byte_order or ByteOrder.ABCD)


# --- tag_value ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uint16", "int16", "uint32", "int32"])
def test_integer_register_without_scale_stays_an_int(kind: str) -> None:
    register = tag("count", 0, kind, unit="pcs")
    value = _tag_value(register, encode_registers(42, register.kind, ByteOrder.ABCD))
    assert value == Value(42, "pcs", Quality.GOOD, ValueType.INT)
    assert type(value.value) is int


def test_float_register_is_a_float_even_without_scale() -> None:
    register = tag("temp", 0, "float32", unit="degC")
    value = _tag_value(register, encode_registers(21.5, RegisterType.FLOAT32, ByteOrder.ABCD))
    assert value == Value(21.5, "degC", Quality.GOOD, ValueType.FLOAT)
    assert type(value.value) is float


def test_scale_on_int16_gives_the_exact_decimal() -> None:
    register = tag("temp", 0, "int16", scale=0.01, unit="degC")
    value = _tag_value(register, [165])
    assert value.type is ValueType.FLOAT
    assert value.value == 1.65  # not 1.6500000000000001
    assert type(value.value) is float
    assert _tag_value(register, encode_registers(-165, RegisterType.INT16, ByteOrder.ABCD)).value == -1.65


def test_offset_applies_after_scale() -> None:
    register = tag("temp", 0, "uint16", scale=0.1, offset=-40.0)
    assert _tag_value(register, [653]) == Value(25.3, None, Quality.GOOD, ValueType.FLOAT)
    only_offset = tag("level", 0, "int16", offset=0.5)
    assert _tag_value(only_offset, [10]) == Value(10.5, None, Quality.GOOD, ValueType.FLOAT)


def test_integral_scale_still_makes_a_float() -> None:
    register = tag("energy", 0, "uint32", scale=10.0, unit="Wh")
    value = _tag_value(register, [0, 7])
    assert value == Value(70.0, "Wh", Quality.GOOD, ValueType.FLOAT)
    assert type(value.value) is float


def test_byte_order_is_applied() -> None:
    register = tag("total", 0, "uint32", byte_order="CDAB")
    assert _tag_value(register, [0x0304, 0x0102]).value == 0x01020304


def test_scaled_float32_is_not_rounded() -> None:
    register = tag("flow", 0, "float32", scale=0.5)
    words = encode_registers(0.125, RegisterType.FLOAT32, ByteOrder.ABCD)
    assert _tag_value(register, words) == Value(0.0625, None, Quality.GOOD, ValueType.FLOAT)


# --- RegisterConfig -----------------------------------------------------------------------


def test_register_config_defaults() -> None:
    register = tag("a", 0)
    assert (register.table, register.byte_order, register.scale, register.offset, register.unit) == (
        "holding",
        None,
        1.0,
        0.0,
        None,
    )
    assert register.keeps_integer
    assert not tag("f", 0, "float32").keeps_integer
    assert not tag("s", 0, scale=0.1).keeps_integer
    assert not tag("o", 0, offset=1.0).keeps_integer


@pytest.mark.parametrize(
    ("scale", "offset", "decimals"),
    [(0.01, 0.0, 2), (0.1, -40.0, 1), (1.0, 0.25, 2), (0.001, 0.5, 3), (1e-05, 0.0, 5), (0.5, 0.125, 3)],
)
def test_decimals_follow_scale_and_offset(scale: float, offset: float, decimals: int) -> None:
    assert tag("a", 0, scale=scale, offset=offset).decimals == decimals


def _bus(*registers: dict[str, object], address_base: int = 0) -> ModbusTcpConfig:
    device = {"name": "d", "registers": list(registers)}
    raw = {"kind": "modbus_tcp", "name": "bus", "host": "127.0.0.1", "address_base": address_base, "devices": [device]}
    return ModbusTcpConfig.model_validate(raw)


def test_a_register_must_fit_in_the_address_space() -> None:
    _bus({"name": "last", "address": 65535, "type": "uint16"})
    _bus({"name": "last32", "address": 65534, "type": "float32"})
    _bus({"name": "one-based", "address": 65536, "type": "uint16"}, address_base=1)
    with pytest.raises(ValidationError, match="'too-far' runs past the last address"):
        _bus({"name": "too-far", "address": 65535, "type": "float32"})
    with pytest.raises(ValidationError, match="below address_base 1"):
        _bus({"name": "zero", "address": 0, "type": "uint16"}, address_base=1)
    with pytest.raises(ValidationError, match="address"):
        tag("negative", -1)


@pytest.mark.parametrize(
    "changes",
    [{"table": "coils"}, {"type": "float128"}, {"byte_order": "ABDC"}, {"name": ""}, {"colour": "red"}],
)
def test_register_config_rejects_bad_options(changes: dict[str, object]) -> None:
    raw = {"name": "a", "address": 0, "type": "uint16", **changes}
    with pytest.raises(ValidationError, match=next(iter(changes))):
        RegisterConfig.model_validate(raw)
