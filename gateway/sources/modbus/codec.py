"""Register words to typed values and back, with one byte-order notation for every width.

Byte order names the order in which the bytes of a value travel on the wire, ``A``
being the most significant: ``ABCD`` is big-endian (Modbus' own convention),
``CDAB`` swaps the 16-bit words, ``BADC`` swaps the bytes inside each word, ``DCBA``
is little-endian. 16-bit types use the first two letters' meaning: ``ABCD`` and
``CDAB`` read a register as-is, ``BADC`` and ``DCBA`` swap its two bytes.
Decoding and encoding go through the same permutation, so a write is the exact
inverse of a read.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import StrEnum

__all__ = ["ByteOrder", "RegisterType", "decode_registers", "encode_registers"]


class RegisterType(StrEnum):
    UINT16 = "uint16"
    INT16 = "int16"
    UINT32 = "uint32"
    INT32 = "int32"
    FLOAT32 = "float32"

    @property
    def width(self) -> int:
        """Number of 16-bit registers a value occupies."""
        return 1 if self in (RegisterType.UINT16, RegisterType.INT16) else 2

    @property
    def is_integer(self) -> bool:
        return self is not RegisterType.FLOAT32


class ByteOrder(StrEnum):
    ABCD = "ABCD"
    CDAB = "CDAB"
    BADC = "BADC"
    DCBA = "DCBA"


_STRUCT = {
    RegisterType.UINT16: ">H",
    RegisterType.INT16: ">h",
    RegisterType.UINT32: ">I",
    RegisterType.INT32: ">i",
    RegisterType.FLOAT32: ">f",
}


def _wire_positions(order: ByteOrder, size: int) -> list[int]:
    """For each value byte (most significant first), its index in the wire bytes."""
    pattern = order.value if size == 4 else ("AB" if order in (ByteOrder.ABCD, ByteOrder.CDAB) else "BA")
    return [pattern.index(letter) for letter in "ABCD"[:size]]


def decode_registers(registers: Sequence[int], kind: RegisterType, order: ByteOrder) -> int | float:
    if len(registers) != kind.width:
        raise ValueError(f"{kind.value} needs {kind.width} registers, got {len(registers)}")
    wire = b"".join(r.to_bytes(2, "big") for r in registers)
    value_bytes = bytes(wire[i] for i in _wire_positions(order, len(wire)))
    (value,) = struct.unpack(_STRUCT[kind], value_bytes)
    return value


def encode_registers(value: int | float, kind: RegisterType, order: ByteOrder) -> list[int]:
    value_bytes = struct.pack(_STRUCT[kind], value)
    wire = bytearray(len(value_bytes))
    for value_index, wire_index in enumerate(_wire_positions(order, len(value_bytes))):
        wire[wire_index] = value_bytes[value_index]
    return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2)]
