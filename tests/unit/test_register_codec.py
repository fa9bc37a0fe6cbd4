"""Register words to typed values and back: known vectors, round trips, and pymodbus as a second opinion."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.client.mixin import ModbusClientMixin

from gateway.sources.modbus.codec import (
    ByteOrder,
    CodecError,
    RegisterType,
    decode_registers,
    decode_string,
    encode_registers,
    encode_string,
)

ABCD, CDAB, BADC, DCBA = ByteOrder.ABCD, ByteOrder.CDAB, ByteOrder.BADC, ByteOrder.DCBA
NUMERIC = [k for k in RegisterType if k.is_numeric]

VECTORS = [
    # float32 1.0 is 0x3F800000
    (RegisterType.FLOAT32, 1.0, ABCD, [0x3F80, 0x0000]),
    (RegisterType.FLOAT32, 1.0, CDAB, [0x0000, 0x3F80]),
    (RegisterType.FLOAT32, 1.0, BADC, [0x803F, 0x0000]),
    (RegisterType.FLOAT32, 1.0, DCBA, [0x0000, 0x803F]),
    # float32 -123.456 is 0xC2F6E979
    (RegisterType.FLOAT32, struct.unpack(">f", bytes.fromhex("c2f6e979"))[0], ABCD, [0xC2F6, 0xE979]),
    (RegisterType.FLOAT32, struct.unpack(">f", bytes.fromhex("c2f6e979"))[0], CDAB, [0xE979, 0xC2F6]),
    (RegisterType.FLOAT32, struct.unpack(">f", bytes.fromhex("c2f6e979"))[0], BADC, [0xF6C2, 0x79E9]),
    (RegisterType.FLOAT32, struct.unpack(">f", bytes.fromhex("c2f6e979"))[0], DCBA, [0x79E9, 0xF6C2]),
    # int16 -2 is 0xFFFE; 16-bit types swap bytes for BADC/DCBA only
    (RegisterType.INT16, -2, ABCD, [0xFFFE]),
    (RegisterType.INT16, -2, CDAB, [0xFFFE]),
    (RegisterType.INT16, -2, BADC, [0xFEFF]),
    (RegisterType.INT16, -2, DCBA, [0xFEFF]),
    (RegisterType.INT16, 0x0102, ABCD, [0x0102]),
    (RegisterType.INT16, 0x0102, DCBA, [0x0201]),
    (RegisterType.UINT16, 0xFF01, ABCD, [0xFF01]),
    (RegisterType.UINT16, 0xFF01, CDAB, [0xFF01]),
    (RegisterType.UINT16, 0xFF01, BADC, [0x01FF]),
    (RegisterType.UINT16, 0xFF01, DCBA, [0x01FF]),
    (RegisterType.UINT32, 0x01020304, ABCD, [0x0102, 0x0304]),
    (RegisterType.UINT32, 0x01020304, CDAB, [0x0304, 0x0102]),
    (RegisterType.UINT32, 0x01020304, BADC, [0x0201, 0x0403]),
    (RegisterType.UINT32, 0x01020304, DCBA, [0x0403, 0x0201]),
    (RegisterType.UINT32, 0xFFFFFFFF, BADC, [0xFFFF, 0xFFFF]),
    # int32 -2 is 0xFFFFFFFE
    (RegisterType.INT32, -2, ABCD, [0xFFFF, 0xFFFE]),
    (RegisterType.INT32, -2, CDAB, [0xFFFE, 0xFFFF]),
    (RegisterType.INT32, -2, BADC, [0xFFFF, 0xFEFF]),
    (RegisterType.INT32, -2, DCBA, [0xFEFF, 0xFFFF]),
    (RegisterType.INT32, -(2**31), ABCD, [0x8000, 0x0000]),
    (RegisterType.INT32, -(2**31), DCBA, [0x0000, 0x0080]),
    # 64-bit: the same two swaps, over four words
    (RegisterType.UINT64, 0x0102030405060708, ABCD, [0x0102, 0x0304, 0x0506, 0x0708]),
    (RegisterType.UINT64, 0x0102030405060708, CDAB, [0x0708, 0x0506, 0x0304, 0x0102]),
    (RegisterType.UINT64, 0x0102030405060708, BADC, [0x0201, 0x0403, 0x0605, 0x0807]),
    (RegisterType.UINT64, 0x0102030405060708, DCBA, [0x0807, 0x0605, 0x0403, 0x0201]),
    (RegisterType.INT64, -2, ABCD, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
    (RegisterType.INT64, -2, CDAB, [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF]),
    (RegisterType.INT64, -2, BADC, [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF]),
    (RegisterType.INT64, -2, DCBA, [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF]),
    # float64 1.0 is 0x3FF0000000000000
    (RegisterType.FLOAT64, 1.0, ABCD, [0x3FF0, 0, 0, 0]),
    (RegisterType.FLOAT64, 1.0, CDAB, [0, 0, 0, 0x3FF0]),
    (RegisterType.FLOAT64, 1.0, BADC, [0xF03F, 0, 0, 0]),
    (RegisterType.FLOAT64, 1.0, DCBA, [0, 0, 0, 0xF03F]),
]


@pytest.mark.parametrize(
    ("kind", "value", "order", "words"),
    VECTORS,
    ids=[f"{k.value}-{v!r}-{o.value}" for k, v, o, _ in VECTORS],
)
def test_known_vectors(kind: RegisterType, value: float, order: ByteOrder, words: list[int]) -> None:
    assert encode_registers(value, kind, order) == words
    decoded = decode_registers(words, kind, order)
    assert decoded == value
    assert type(decoded) is type(value)


def test_every_type_and_order_has_a_vector() -> None:
    covered = {(kind, order) for kind, _, order, _ in VECTORS}
    assert {
        (k, o) for k in (RegisterType.FLOAT32, RegisterType.INT16, RegisterType.UINT32) for o in ByteOrder
    } <= covered
    assert {k for k, _ in covered} == set(NUMERIC)


def test_widths() -> None:
    assert {k.value: k.width for k in NUMERIC} == {
        "uint16": 1,
        "int16": 1,
        "uint32": 2,
        "int32": 2,
        "uint64": 4,
        "int64": 4,
        "float32": 2,
        "float64": 4,
    }
    assert [k for k in NUMERIC if not k.is_integer] == [RegisterType.FLOAT32, RegisterType.FLOAT64]


@pytest.mark.parametrize(
    ("long", "short"), [("ABCDEFGH", ABCD), ("GHEFCDAB", CDAB), ("BADCFEHG", BADC), ("HGFEDCBA", DCBA)]
)
def test_64_bit_spellings_are_synonyms(long: str, short: ByteOrder) -> None:
    assert ByteOrder.parse(long) is short
    assert ByteOrder.parse(short.value.lower()) is short
    with pytest.raises(ValueError, match="unknown byte order 'ABDC'"):
        ByteOrder.parse("ABDC")


def test_strings_keep_character_order_and_swap_bytes_only() -> None:
    assert encode_string("AB12", 3, ABCD) == [0x4142, 0x3132, 0]
    assert encode_string("AB12", 3, CDAB) == [0x4142, 0x3132, 0]
    assert encode_string("AB12", 3, BADC) == [0x4241, 0x3231, 0]
    assert decode_string([0x4241, 0x3231, 0], DCBA) == "AB12"
    assert decode_string([0x4142, 0x4320, 0x2020], ABCD) == "ABC"  # space padding removed
    assert decode_string([0x4142, 0x0058], ABCD) == "AB"  # garbage after a NUL ignored
    with pytest.raises(CodecError, match="3 registers hold at most 6"):
        encode_string("1234567", 3, ABCD)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=20).map(str.rstrip),
    order=st.sampled_from(list(ByteOrder)),
)
def test_string_round_trip(text: str, order: ByteOrder) -> None:
    assert decode_string(encode_string(text, 10, order), order) == text


def test_out_of_range_values_are_codec_errors() -> None:
    with pytest.raises(CodecError, match="outside the range of int16"):
        encode_registers(40000, RegisterType.INT16, ABCD)
    with pytest.raises(CodecError, match="outside the range of uint64"):
        encode_registers(-1, RegisterType.UINT64, ABCD)
    with pytest.raises(CodecError, match="not a whole number"):
        encode_registers(1.5, RegisterType.UINT16, ABCD)
    with pytest.raises(CodecError, match="does not fit float32"):
        encode_registers(1e300, RegisterType.FLOAT32, ABCD)


_RANGES = {
    RegisterType.UINT16: st.integers(0, 2**16 - 1),
    RegisterType.INT16: st.integers(-(2**15), 2**15 - 1),
    RegisterType.UINT32: st.integers(0, 2**32 - 1),
    RegisterType.INT32: st.integers(-(2**31), 2**31 - 1),
    RegisterType.UINT64: st.integers(0, 2**64 - 1),
    RegisterType.INT64: st.integers(-(2**63), 2**63 - 1),
    RegisterType.FLOAT32: st.floats(width=32, allow_nan=False),
    RegisterType.FLOAT64: st.floats(allow_nan=False),
}

values_of_every_type = st.sampled_from(NUMERIC).flatmap(lambda k: st.tuples(st.just(k), _RANGES[k]))


@settings(max_examples=300, deadline=None)
@given(kind_value=values_of_every_type, order=st.sampled_from(list(ByteOrder)))
def test_decode_inverts_encode(kind_value: tuple[RegisterType, float], order: ByteOrder) -> None:
    kind, value = kind_value
    words = encode_registers(value, kind, order)
    assert len(words) == kind.width
    assert all(0 <= w <= 0xFFFF for w in words)
    back = decode_registers(words, kind, order)
    assert back == value
    assert math.copysign(1.0, back) == math.copysign(1.0, value)  # -0.0 stays -0.0


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(NUMERIC),
    order=st.sampled_from(list(ByteOrder)),
    words=st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4),
)
def test_encode_inverts_decode(kind: RegisterType, order: ByteOrder, words: list[int]) -> None:
    words = words[: kind.width]
    value = decode_registers(words, kind, order)
    if isinstance(value, float) and math.isnan(value):
        return  # NaN payloads are not promised to survive a trip through a Python float
    assert encode_registers(value, kind, order) == words


def test_nan_and_infinity_survive() -> None:
    for order in ByteOrder:
        assert math.isnan(
            decode_registers(encode_registers(math.nan, RegisterType.FLOAT32, order), RegisterType.FLOAT32, order)
        )
        for value in (math.inf, -math.inf):
            assert (
                decode_registers(encode_registers(value, RegisterType.FLOAT32, order), RegisterType.FLOAT32, order)
                == value
            )


@pytest.mark.parametrize("kind", NUMERIC)
@pytest.mark.parametrize("order", list(ByteOrder))
def test_wrong_register_count_is_a_value_error(kind: RegisterType, order: ByteOrder) -> None:
    for count in (0, kind.width - 1, kind.width + 1, 5):
        if count == kind.width:
            continue
        with pytest.raises(ValueError, match=f"{kind.value} needs {kind.width} registers, got {count}"):
            decode_registers([0] * count, kind, order)


# --- pymodbus as an independent implementation -------------------------------------------

_DATATYPE = {
    RegisterType.UINT16: ModbusClientMixin.DATATYPE.UINT16,
    RegisterType.INT16: ModbusClientMixin.DATATYPE.INT16,
    RegisterType.UINT32: ModbusClientMixin.DATATYPE.UINT32,
    RegisterType.INT32: ModbusClientMixin.DATATYPE.INT32,
    RegisterType.UINT64: ModbusClientMixin.DATATYPE.UINT64,
    RegisterType.INT64: ModbusClientMixin.DATATYPE.INT64,
    RegisterType.FLOAT32: ModbusClientMixin.DATATYPE.FLOAT32,
    RegisterType.FLOAT64: ModbusClientMixin.DATATYPE.FLOAT64,
}


def test_pymodbus_agrees_on_float32_one() -> None:
    assert ModbusClientMixin.convert_to_registers(1.0, ModbusClientMixin.DATATYPE.FLOAT32) == [0x3F80, 0x0000]
    assert encode_registers(1.0, RegisterType.FLOAT32, ABCD) == [0x3F80, 0x0000]


@settings(max_examples=200, deadline=None)
@given(kind_value=values_of_every_type)
def test_abcd_matches_pymodbus_big_word_order(kind_value: tuple[RegisterType, float]) -> None:
    kind, value = kind_value
    theirs = ModbusClientMixin.convert_to_registers(value, _DATATYPE[kind])
    assert encode_registers(value, kind, ABCD) == theirs
    assert decode_registers(theirs, kind, ABCD) == ModbusClientMixin.convert_from_registers(theirs, _DATATYPE[kind])


@settings(max_examples=200, deadline=None)
@given(kind_value=values_of_every_type.filter(lambda kv: kv[0].width > 1))
def test_cdab_matches_pymodbus_little_word_order(kind_value: tuple[RegisterType, float]) -> None:
    kind, value = kind_value
    theirs = ModbusClientMixin.convert_to_registers(value, _DATATYPE[kind], word_order="little")
    assert encode_registers(value, kind, CDAB) == theirs
