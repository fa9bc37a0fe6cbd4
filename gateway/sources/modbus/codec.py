"""Register words to typed values and back, with one byte-order notation for every width.

Byte order names the order in which the bytes of a value travel on the wire, ``A``
being the most significant byte. The four names are two independent swaps:

* ``ABCD``: big-endian, Modbus' own convention;
* ``CDAB``: the 16-bit words in reverse order (the "word swap" of many PLCs);
* ``BADC``: the two bytes inside each word swapped;
* ``DCBA``: both, which is little-endian.

The same rule holds for every width, so 64-bit values use the same four names;
their explicit eight-letter spellings (``ABCDEFGH``, ``GHEFCDAB``, ``BADCFEHG``,
``HGFEDCBA``) are accepted as synonyms. A 16-bit value has one word: ``ABCD`` and
``CDAB`` read it as-is, ``BADC`` and ``DCBA`` swap its bytes. A string keeps its
characters in order and only the byte swap applies: with ``BADC``/``DCBA`` the
first character sits in the low byte of the first register.

Both swaps are their own inverse, so encoding runs the same permutation as
decoding: a write is the exact inverse of a read.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import StrEnum

__all__ = [
    "ByteOrder",
    "CodecError",
    "RegisterType",
    "decode_registers",
    "decode_string",
    "encode_registers",
    "encode_string",
    "permute",
]


class CodecError(ValueError):
    """A value that cannot be encoded into its registers (out of range, wrong kind)."""


class RegisterType(StrEnum):
    BOOL = "bool"
    UINT16 = "uint16"
    INT16 = "int16"
    UINT32 = "uint32"
    INT32 = "int32"
    UINT64 = "uint64"
    INT64 = "int64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"

    @property
    def width(self) -> int:
        """16-bit registers one value occupies (a string's width is its configured length)."""
        return _WIDTH.get(self, 1)

    @property
    def is_integer(self) -> bool:
        return self in _INTEGER_RANGE

    @property
    def is_float(self) -> bool:
        return self in (RegisterType.FLOAT32, RegisterType.FLOAT64)

    @property
    def is_numeric(self) -> bool:
        return self.is_integer or self.is_float


_WIDTH = {
    RegisterType.UINT32: 2,
    RegisterType.INT32: 2,
    RegisterType.FLOAT32: 2,
    RegisterType.UINT64: 4,
    RegisterType.INT64: 4,
    RegisterType.FLOAT64: 4,
}

_STRUCT = {
    RegisterType.UINT16: ">H",
    RegisterType.INT16: ">h",
    RegisterType.UINT32: ">I",
    RegisterType.INT32: ">i",
    RegisterType.UINT64: ">Q",
    RegisterType.INT64: ">q",
    RegisterType.FLOAT32: ">f",
    RegisterType.FLOAT64: ">d",
}

_INTEGER_RANGE = {
    RegisterType.UINT16: (0, 2**16 - 1),
    RegisterType.INT16: (-(2**15), 2**15 - 1),
    RegisterType.UINT32: (0, 2**32 - 1),
    RegisterType.INT32: (-(2**31), 2**31 - 1),
    RegisterType.UINT64: (0, 2**64 - 1),
    RegisterType.INT64: (-(2**63), 2**63 - 1),
}


class ByteOrder(StrEnum):
    ABCD = "ABCD"
    CDAB = "CDAB"
    BADC = "BADC"
    DCBA = "DCBA"

    @classmethod
    def parse(cls, text: str) -> ByteOrder:
        """A byte order by name, accepting the 64-bit spellings; ValueError lists the choices."""
        name = text.strip().upper()
        name = _LONG_NAMES.get(name, name)
        try:
            return cls(name)
        except ValueError:
            choices = ", ".join([*(o.value for o in cls), *_LONG_NAMES])
            raise ValueError(f"unknown byte order {text!r}; expected one of {choices}") from None

    @property
    def swaps_bytes(self) -> bool:
        return self in (ByteOrder.BADC, ByteOrder.DCBA)

    @property
    def swaps_words(self) -> bool:
        return self in (ByteOrder.CDAB, ByteOrder.DCBA)


_LONG_NAMES = {
    "ABCDEFGH": "ABCD",
    "GHEFCDAB": "CDAB",
    "BADCFEHG": "BADC",
    "HGFEDCBA": "DCBA",
}


def _swap_bytes(data: bytes) -> bytes:
    swapped = bytearray(data)
    swapped[0::2], swapped[1::2] = data[1::2], data[0::2]
    return bytes(swapped)


def permute(data: bytes, order: ByteOrder) -> bytes:
    """Value bytes (most significant first) <-> wire bytes; its own inverse."""
    if order.swaps_bytes:
        data = _swap_bytes(data)
    if order.swaps_words:
        data = b"".join(data[i : i + 2] for i in range(len(data) - 2, -1, -2))
    return data


def _words_to_bytes(registers: Sequence[int]) -> bytes:
    return b"".join(r.to_bytes(2, "big") for r in registers)


def _bytes_to_words(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def decode_registers(registers: Sequence[int], kind: RegisterType, order: ByteOrder) -> int | float:
    """A numeric value from its registers."""
    if kind not in _STRUCT:
        raise ValueError(f"{kind.value} is not a numeric register type")
    if len(registers) != kind.width:
        raise ValueError(f"{kind.value} needs {kind.width} registers, got {len(registers)}")
    (value,) = struct.unpack(_STRUCT[kind], permute(_words_to_bytes(registers), order))
    return value  # type: ignore[no-any-return]


def encode_registers(value: int | float, kind: RegisterType, order: ByteOrder) -> list[int]:
    """The registers of a numeric value; CodecError if it does not fit the type."""
    if kind not in _STRUCT:
        raise ValueError(f"{kind.value} is not a numeric register type")
    if kind.is_integer:
        if isinstance(value, float) and not value.is_integer():
            raise CodecError(f"{value!r} is not a whole number, as {kind.value} needs")
        low, high = _INTEGER_RANGE[kind]
        if not low <= int(value) <= high:
            raise CodecError(f"{value!r} is outside the range of {kind.value} ({low}..{high})")
        value = int(value)
    try:
        packed = struct.pack(_STRUCT[kind], value)
    except (struct.error, OverflowError) as exc:  # a float beyond float32's range
        raise CodecError(f"{value!r} does not fit {kind.value}: {exc}") from None
    return _bytes_to_words(permute(packed, order))


def decode_string(registers: Sequence[int], order: ByteOrder) -> str:
    """Two characters per register; trailing NULs and spaces (the usual padding) removed."""
    data = _words_to_bytes(registers)
    if order.swaps_bytes:
        data = _swap_bytes(data)
    # Devices pad with NUL or spaces and some leave garbage after a NUL: stop at the first.
    data = data.split(b"\0", 1)[0].rstrip(b" ")
    return data.decode("latin-1")


def encode_string(text: str, length: int, order: ByteOrder) -> list[int]:
    """``length`` registers holding ``text``, NUL-padded; CodecError if it is longer."""
    try:
        data = text.encode("latin-1")
    except UnicodeEncodeError:
        raise CodecError(f"{text!r} has characters a register string cannot hold (latin-1 only)") from None
    if len(data) > 2 * length:
        raise CodecError(f"{text!r} is {len(data)} characters; {length} registers hold at most {2 * length}")
    data = data.ljust(2 * length, b"\0")
    if order.swaps_bytes:
        data = _swap_bytes(data)
    return _bytes_to_words(data)
