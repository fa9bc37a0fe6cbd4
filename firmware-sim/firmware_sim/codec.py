"""Values <-> Modbus register words, with ``struct`` only.

The simulator is the gateway's test oracle, so it never imports the gateway's
codec: a test that decodes with a third implementation catches a bug in either.

Byte orders name the bytes of the big-endian value ``A B C D (E F G H)``:

* ``ABCD`` big-endian (the default), ``DCBA`` little-endian,
* ``CDAB`` the word order reversed, bytes in each word kept,
* ``BADC`` the two bytes of every word swapped, word order kept.

For 64-bit types the same four names mean the same rule; ``ABCDEFGH``,
``GHEFCDAB``, ``BADCFEHG`` and ``HGFEDCBA`` are accepted as their synonyms.
A 16-bit value has one word: ``ABCD``/``CDAB`` keep it, ``BADC``/``DCBA`` swap its
bytes. A string is not a number: ``ABCD``/``CDAB`` put its first character in the
high byte of the first word, ``BADC``/``DCBA`` in the low byte.
"""

from __future__ import annotations

import math
import struct
from typing import Final, Literal, get_args

__all__ = [
    "BYTE_ORDERS",
    "REGISTER_WIDTH",
    "BitTable",
    "ByteOrder",
    "RegisterType",
    "Table",
    "Value",
    "decode",
    "encode",
    "normalize_byte_order",
    "width",
]

RegisterType = Literal["bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"]
Table = Literal["coil", "discrete_input", "holding", "input"]
BitTable = Literal["coil", "discrete_input"]
ByteOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
#: What every accepted spelling means.
BYTE_ORDERS: Final[dict[str, ByteOrder]] = {
    **{name: name for name in get_args(ByteOrder)},
    "ABCDEFGH": "ABCD",
    "GHEFCDAB": "CDAB",
    "BADCFEHG": "BADC",
    "HGFEDCBA": "DCBA",
}
BIT_TABLES: Final = frozenset(get_args(BitTable))

#: A decoded value: numbers for numeric types, str for strings, bool for bools.
Value = float | int | str | bool

#: Registers (16-bit words) one value of each fixed-size type occupies; a bool is
#: one bit (of a coil, a discrete input, or of a register word), a string ``length`` words.
REGISTER_WIDTH: Final[dict[str, int]] = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}

# struct format (big-endian, ABCD) and the range an integer type can hold; out-of-range
# values are clamped, as a real transmitter saturates instead of wrapping around.
_INTEGERS: Final[dict[str, tuple[str, int, int]]] = {
    "uint16": (">H", 0, 0xFFFF),
    "int16": (">h", -0x8000, 0x7FFF),
    "uint32": (">I", 0, 0xFFFF_FFFF),
    "int32": (">i", -0x8000_0000, 0x7FFF_FFFF),
    "uint64": (">Q", 0, 0xFFFF_FFFF_FFFF_FFFF),
    "int64": (">q", -0x8000_0000_0000_0000, 0x7FFF_FFFF_FFFF_FFFF),
}
_FLOAT32_MAX: Final = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]


def normalize_byte_order(name: str) -> ByteOrder:
    """``GHEFCDAB`` -> ``CDAB``; raise ValueError for a name that is not a byte order."""
    try:
        return BYTE_ORDERS[name]
    except KeyError:
        raise ValueError(f"must be one of {', '.join(BYTE_ORDERS)}, got {name!r}") from None


def width(type_: str, length: int | None = None) -> int:
    """Registers a value takes: ``length`` for a string, else fixed by the type."""
    if type_ == "string":
        if length is None:
            raise ValueError("a string needs a length (in registers)")
        return length
    return REGISTER_WIDTH[type_]


def _round_half_away(raw: float) -> int:
    # Device firmware usually rounds half away from zero; round() would give
    # banker's rounding (2.5 -> 2).
    return int(math.copysign(math.floor(abs(raw) + 0.5), raw))


def _big_endian_bytes(value: Value, type_: str, scale: float, length: int | None) -> bytes:
    if type_ == "string":
        text = str(value).encode("ascii", errors="replace")
        size = 2 * width(type_, length)
        return text[:size].ljust(size, b"\0")  # NUL padded, cut at the register count
    if isinstance(value, str):
        raise TypeError(f"a {type_} cannot hold the text {value!r}")
    # An int with scale 1 stays exact: a float would lose the low bits of a 64-bit value.
    raw: float | int = value if isinstance(value, int) and scale == 1 else value / scale
    if type_ == "float32":
        return struct.pack(">f", max(-_FLOAT32_MAX, min(_FLOAT32_MAX, raw)))
    if type_ == "float64":
        return struct.pack(">d", raw)
    fmt, low, high = _INTEGERS[type_]
    rounded = raw if isinstance(raw, int) else _round_half_away(raw)
    return struct.pack(fmt, max(low, min(high, rounded)))


def _reorder(data: bytes, type_: str, order: ByteOrder) -> bytes:
    """Big-endian bytes -> bytes in ``order``; the same function undoes itself."""
    swap_bytes = order in {"BADC", "DCBA"}
    # A string and a 16-bit value have no word order to reverse.
    reverse_words = order in {"CDAB", "DCBA"} and type_ != "string"
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if reverse_words:
        words.reverse()
    if swap_bytes:
        words = [w[::-1] for w in words]
    return b"".join(words)


def encode(
    value: Value,
    type_: RegisterType,
    scale: float = 1.0,
    byte_order: ByteOrder = "ABCD",
    length: int | None = None,
) -> list[int]:
    """Raw register words for ``value``: ``raw = value / scale``, in ``byte_order``.

    Integer types round half away from zero and clamp to their range; float32
    clamps to the largest finite float32 rather than failing on overflow. A bool
    encodes to ``[0]`` or ``[1]`` (nonzero is true); ``scale`` does not apply to it.
    """
    if type_ == "bool":
        return [1 if value else 0]  # a bit has no bytes to order
    data = _reorder(_big_endian_bytes(value, type_, scale, length), type_, byte_order)
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def decode(words: list[int], type_: RegisterType, scale: float = 1.0, byte_order: ByteOrder = "ABCD") -> Value:
    """The value ``words`` hold: the inverse of ``encode`` (for values it can represent)."""
    if type_ == "bool":
        return any(words)
    data = _reorder(b"".join(w.to_bytes(2, "big") for w in words), type_, byte_order)
    if type_ == "string":
        return data.rstrip(b"\0").decode("ascii", errors="replace")
    if type_ in {"float32", "float64"}:
        (raw,) = struct.unpack(">f" if type_ == "float32" else ">d", data)
        return float(raw) * scale
    (number,) = struct.unpack(_INTEGERS[type_][0], data)
    return int(number) if scale == 1 else number * scale
