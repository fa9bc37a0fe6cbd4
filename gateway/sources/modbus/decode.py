"""Register words to tag values, prepared once per tag so that a poll only unpacks.

Everything a tag's decoding depends on (type, byte order, scale, offset, decimal
places, its position in the read) is fixed by the config, so it is worked out when
the poller starts; a poll turns the block's words into bytes once and unpacks each
tag with a precompiled ``struct.Struct``. This is the hot path of acquisition: a
200-device gateway decodes thousands of values a second on a small board.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from math import isfinite

from fieldlink.wire import Quality, Value, ValueType
from gateway.sources.modbus.codec import ByteOrder, RegisterType, decode_string, permute
from gateway.sources.modbus.config import RegisterConfig

__all__ = ["TagDecoder", "decode_block", "float32_decimal", "tag_value", "value_type"]

_STRUCTS = {
    RegisterType.UINT16: struct.Struct(">H"),
    RegisterType.INT16: struct.Struct(">h"),
    RegisterType.UINT32: struct.Struct(">I"),
    RegisterType.INT32: struct.Struct(">i"),
    RegisterType.UINT64: struct.Struct(">Q"),
    RegisterType.INT64: struct.Struct(">q"),
    RegisterType.FLOAT32: struct.Struct(">f"),
    RegisterType.FLOAT64: struct.Struct(">d"),
}
_FLOAT32 = _STRUCTS[RegisterType.FLOAT32]


def float32_decimal(value: float) -> float:
    """A float32 as the decimal of its own precision: 231.7, not 231.6999969482422.

    A float32 holds about 7 significant digits; widened to a Python float it shows
    digits the device never had. Rounded to 7 digits (8 or 9 when 7 would change the
    bits), it converts back to the same 32 bits.
    """
    if not isfinite(value):
        return value
    pack = _FLOAT32.pack
    bits = pack(value)
    for digits in (7, 8, 9):
        candidate = float(f"{value:.{digits}g}")
        try:
            if pack(candidate) == bits:
                return candidate
        except OverflowError:  # rounded up past the float32 range
            continue
    return value


def value_type(tag: RegisterConfig) -> ValueType:
    kind = tag.kind
    if kind is RegisterType.BOOL:
        return ValueType.BOOL
    if kind is RegisterType.STRING:
        return ValueType.STRING
    return ValueType.INT if tag.keeps_integer else ValueType.FLOAT


Read = Callable[[bytes, Sequence[int]], Value]
"""Decodes one tag from its block's bytes (big-endian words) and words."""

_GOOD = Quality.GOOD
_INT, _FLOAT, _BOOL, _STRING = ValueType.INT, ValueType.FLOAT, ValueType.BOOL, ValueType.STRING


class TagDecoder:
    """One tag at ``offset`` registers (or bits) into its read.

    ``read`` is a function chosen and bound once for the tag's type, byte order and
    scaling, so decoding a poll runs no config lookups and no branches on config.
    """

    __slots__ = ("bad", "name", "offset", "read", "tag")

    def __init__(self, tag: RegisterConfig, order: ByteOrder, offset: int) -> None:
        self.tag = tag
        self.name = tag.name
        self.offset = offset
        self.bad = Value(None, tag.unit, Quality.BAD, value_type(tag))
        self.read: Read = _reader(tag, order, offset, self.bad)


def _reader(tag: RegisterConfig, order: ByteOrder, offset: int, bad: Value) -> Read:
    unit, kind, width, start = tag.unit, tag.kind, tag.width, 2 * offset
    if tag.is_bit_table:  # the words of a coil or discrete input read are its bits
        return lambda data, words: Value(bool(words[offset]), unit, _GOOD, _BOOL)
    if tag.bit is not None:
        bit = tag.bit
        return lambda data, words: Value(bool(words[offset] >> bit & 1), unit, _GOOD, _BOOL)
    if kind is RegisterType.STRING:
        return lambda data, words: Value(decode_string(words[offset : offset + width], order), unit, _GOOD, _STRING)
    layout = _STRUCTS[kind]
    if order is ByteOrder.ABCD:
        unpack_from = layout.unpack_from

        def raw(data: bytes) -> int | float:
            return unpack_from(data, start)[0]  # type: ignore[no-any-return]
    else:
        unpack, end = layout.unpack, start + 2 * width

        def raw(data: bytes) -> int | float:
            return unpack(permute(data[start:end], order))[0]  # type: ignore[no-any-return]

    if tag.keeps_integer:
        return lambda data, words: Value(raw(data), unit, _GOOD, _INT)
    scale, shift = tag.scale, tag.offset
    if kind.is_integer:  # scaled: a measurement, rounded to the decimals of scale/offset
        decimals = tag.decimals
        return lambda data, words: Value(round(raw(data) * scale + shift, decimals), unit, _GOOD, _FLOAT)
    plain = scale == 1.0 and shift == 0.0
    widen = float32_decimal if kind is RegisterType.FLOAT32 else float

    def read_float(data: bytes, words: Sequence[int]) -> Value:
        number = widen(raw(data))
        if not plain:
            number = number * scale + shift
        if not isfinite(number):
            # A float register holding NaN/inf (uninitialised, sensor fault) is no measurement.
            return bad
        return Value(number, unit, _GOOD, _FLOAT)

    return read_float


def decode_block(decoders: Sequence[TagDecoder], words: Sequence[int], bits: bool) -> list[tuple[str, Value]]:
    """Every tag of one read; a tag that cannot be decoded is ``bad``, the others are not affected."""
    data = b"" if bits else struct.pack(f">{len(words)}H", *words)
    try:
        return [(d.name, d.read(data, words)) for d in decoders]
    except (ValueError, OverflowError, struct.error):  # not for valid words; never fail a poll
        return [(d.name, _safely(d, data, words)) for d in decoders]


def _safely(decoder: TagDecoder, data: bytes, words: Sequence[int]) -> Value:
    try:
        return decoder.read(data, words)
    except (ValueError, OverflowError, struct.error):
        return decoder.bad


def tag_value(tag: RegisterConfig, words: Sequence[int], order: ByteOrder) -> Value:
    """The typed value of one tag from its own registers (or bits): what a poll reports."""
    ((_, value),) = decode_block([TagDecoder(tag, order, 0)], words, tag.is_bit_table)
    return value
