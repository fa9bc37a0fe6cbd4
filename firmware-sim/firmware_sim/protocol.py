"""Modbus at the byte level: request PDUs answered from a ``UnitMemory``, and framing.

Our own, small and with ``struct`` only, rather than pymodbus' server: the
simulator must misbehave on purpose (stay silent, corrupt a CRC, drop a
connection, delay one unit on a shared bus), which needs control of every byte
that leaves it, and as the gateway's test oracle it should not share its
Modbus implementation with the client under test.

Functions: 1, 2 (read bits), 3, 4 (read registers), 5, 15 (write coils),
6, 16 (write holding registers), 22 (mask write), 23 (read/write registers).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .memory import UnitMemory
from .signals import LiveRegister, Table

__all__ = [
    "READ_FUNCTIONS",
    "WRITE_FUNCTIONS",
    "Reply",
    "RtuParser",
    "answer",
    "crc16",
    "exception_pdu",
    "request_spans",
    "rtu_frame",
]

READ_FUNCTIONS: Final = frozenset({1, 2, 3, 4, 23})
WRITE_FUNCTIONS: Final = frozenset({5, 6, 15, 16, 22, 23})

ILLEGAL_FUNCTION: Final = 1
ILLEGAL_ADDRESS: Final = 2
ILLEGAL_VALUE: Final = 3
GATEWAY_NO_RESPONSE: Final = 11

_READ_TABLE: Final[dict[int, Table]] = {1: "coil", 2: "discrete_input", 3: "holding", 4: "input"}


class _Refused(Exception):
    """Answer with this exception code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Reply:
    """The response PDU to a request, and the registers the request wrote."""

    pdu: bytes
    written: list[LiveRegister] = field(default_factory=list)

    @property
    def is_exception(self) -> bool:
        return bool(self.pdu[0] & 0x80)


def exception_pdu(function: int, code: int) -> bytes:
    return bytes([(function | 0x80) & 0xFF, code])


def request_spans(pdu: bytes) -> list[range]:
    """The address ranges a request touches (for faults limited to some addresses)."""
    try:
        if pdu[0] in {1, 2, 3, 4, 15, 16}:
            address, count = struct.unpack_from(">HH", pdu, 1)
            return [range(address, address + count)]
        if pdu[0] in {5, 6, 22}:
            (address,) = struct.unpack_from(">H", pdu, 1)
            return [range(address, address + 1)]
        if pdu[0] == 23:
            read, rcount, write, wcount = struct.unpack_from(">HHHH", pdu, 1)
            return [range(read, read + rcount), range(write, write + wcount)]
    except struct.error:
        pass
    return []


def answer(memory: UnitMemory, pdu: bytes, t: float) -> Reply:
    """Execute one request PDU against ``memory`` at time ``t``."""
    function = pdu[0]
    if (execute := _FUNCTIONS.get(function)) is None:
        return Reply(exception_pdu(function, ILLEGAL_FUNCTION))
    try:
        return execute(memory, pdu, t)
    except _Refused as refused:
        return Reply(exception_pdu(function, refused.code))
    except (struct.error, IndexError):  # a request shorter than its function needs
        return Reply(exception_pdu(function, ILLEGAL_VALUE))


def _quantity(count: int, most: int, address: int) -> None:
    if not 1 <= count <= most:
        raise _Refused(ILLEGAL_VALUE)
    if address + count > 0x10000:
        raise _Refused(ILLEGAL_ADDRESS)


def _pack_bits(bits: list[bool]) -> bytes:
    data = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            data[i // 8] |= 1 << (i % 8)  # first coil in the lowest bit of the first byte
    return bytes(data)


def _read_registers(memory: UnitMemory, table: Table, address: int, count: int, t: float) -> bytes:
    words = memory.read_words(table, address, count, t)
    if words is None:
        raise _Refused(ILLEGAL_ADDRESS)
    return struct.pack(f">B{count}H", 2 * count, *words)


def _read_bits(memory: UnitMemory, pdu: bytes, t: float) -> Reply:
    address, count = struct.unpack(">HH", pdu[1:])
    _quantity(count, 2000, address)
    bits = memory.read_bits(_READ_TABLE[pdu[0]], address, count, t)
    if bits is None:
        raise _Refused(ILLEGAL_ADDRESS)
    packed = _pack_bits(bits)
    return Reply(bytes([pdu[0], len(packed)]) + packed)


def _read(memory: UnitMemory, pdu: bytes, t: float) -> Reply:
    address, count = struct.unpack(">HH", pdu[1:])
    _quantity(count, 125, address)
    return Reply(bytes([pdu[0]]) + _read_registers(memory, _READ_TABLE[pdu[0]], address, count, t))


def _written(written: list[LiveRegister] | None) -> list[LiveRegister]:
    if written is None:
        raise _Refused(ILLEGAL_ADDRESS)
    return written


def _write_coil(memory: UnitMemory, pdu: bytes, t: float) -> Reply:
    address, value = struct.unpack(">HH", pdu[1:])
    if value not in {0x0000, 0xFF00}:
        raise _Refused(ILLEGAL_VALUE)
    return Reply(pdu, _written(memory.write_bits(address, [value == 0xFF00])))  # the echo of the request


def _write_register(memory: UnitMemory, pdu: bytes, t: float) -> Reply:
    address, value = struct.unpack(">HH", pdu[1:])
    return Reply(pdu, _written(memory.write_words(address, [value], t)))


def _write_coils(memory: UnitMemory, pdu: bytes, t: float) -> Reply:
    address, count, size = struct.unpack_from(">HHB", pdu, 1)
    _quantity(count, 1968, address)
    if size != (count + 7) // 8 or len(pdu) != 6 + size:
        raise _Refused(ILLEGAL_VALUE)
    bits = [bool(pdu[6 + i // 8] >> (i % 8) & 1) for i in range(count)]
    return Reply(pdu[:5], _written(memory.write_bits(address, bits)))


def _write_registers(memory: UnitMemory, pdu: bytes, t: float) -> Reply:
    address, count, size = struct.unpack_from(">HHB", pdu, 1)
    _quantity(count, 123, address)
    if size != 2 * count or len(pdu) != 6 + size:
        raise _Refused(ILLEGAL_VALUE)
    return Reply(pdu[:5], _written(memory.write_words(address, struct.unpack_from(f">{count}H", pdu, 6), t)))


def _mask_write(memory: UnitMemory, pdu: bytes, t: float) -> Reply:
    address, and_mask, or_mask = struct.unpack(">HHH", pdu[1:])
    current = memory.read_words("holding", address, 1, t)
    if current is None:
        raise _Refused(ILLEGAL_ADDRESS)
    value = (current[0] & and_mask) | (or_mask & ~and_mask & 0xFFFF)
    return Reply(pdu, _written(memory.write_words(address, [value], t)))


def _read_write(memory: UnitMemory, pdu: bytes, t: float) -> Reply:
    read, rcount, write, wcount, size = struct.unpack_from(">HHHHB", pdu, 1)
    _quantity(rcount, 125, read)
    _quantity(wcount, 121, write)
    if size != 2 * wcount or len(pdu) != 10 + size:
        raise _Refused(ILLEGAL_VALUE)
    # Check the read side first: a refused request must write nothing.
    if memory.read_words("holding", read, rcount, t) is None:
        raise _Refused(ILLEGAL_ADDRESS)
    written = _written(memory.write_words(write, struct.unpack_from(f">{wcount}H", pdu, 10), t))
    # The spec runs the write before the read.
    return Reply(bytes([pdu[0]]) + _read_registers(memory, "holding", read, rcount, t), written)


_FUNCTIONS: Final[dict[int, Callable[[UnitMemory, bytes, float], Reply]]] = {
    1: _read_bits,
    2: _read_bits,
    3: _read,
    4: _read,
    5: _write_coil,
    6: _write_register,
    15: _write_coils,
    16: _write_registers,
    22: _mask_write,
    23: _read_write,
}


# --- RTU framing -----------------------------------------------------------------------


def crc16(data: bytes) -> int:
    """Modbus CRC-16 (polynomial 0xA001 reflected, initial 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def rtu_frame(unit: int, pdu: bytes, *, corrupt_crc: bool = False) -> bytes:
    """``unit + pdu + CRC`` (CRC low byte first); ``corrupt_crc`` inverts the CRC."""
    body = bytes([unit]) + pdu
    crc = crc16(body) ^ (0xFFFF if corrupt_crc else 0)
    return body + struct.pack("<H", crc)


def _request_length(buffer: bytes) -> int | None:
    """Length of the RTU request at the start of ``buffer``; None: need more; 0: unknown function."""
    if len(buffer) < 2:
        return None
    function = buffer[1]
    if function in {1, 2, 3, 4, 5, 6}:
        return 8
    if function == 22:
        return 10
    if function in {15, 16}:
        return 9 + buffer[6] if len(buffer) >= 7 else None
    if function == 23:
        return 13 + buffer[10] if len(buffer) >= 11 else None
    return 0


class RtuParser:
    """Cuts requests out of the bytes a serial line delivers.

    A pty has no inter-character timing, so a frame's length comes from its
    function code (for a function we do not know: the first length whose CRC
    matches). A bad CRC drops one byte and hunts for the next frame; the caller
    calls ``reset()`` after a silent gap, as the RTU 3.5-character timer would.
    """

    MAX_FRAME: Final = 256

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    def reset(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; return the complete requests as (unit, PDU)."""
        self._buffer += data
        frames: list[tuple[int, bytes]] = []
        while (length := _request_length(self._buffer)) is not None:
            if length == 0:
                length = self._length_by_crc()
                if length is None:
                    # Noise that looks like an unknown function: skip it if a whole
                    # valid frame follows; else wait for more bytes (or the idle gap).
                    if (skip := self._next_valid_frame()) is None:
                        break
                    self._buffer = self._buffer[skip:]
                    continue
            if len(self._buffer) < length:
                break
            frame, rest = self._buffer[:length], self._buffer[length:]
            if length >= 4 and crc16(frame[:-2]) == struct.unpack("<H", frame[-2:])[0]:
                frames.append((frame[0], frame[1:-2]))
                self._buffer = rest
            else:
                self._buffer = self._buffer[1:]  # not a frame: hunt from the next byte
        return frames

    def _next_valid_frame(self) -> int | None:
        for skip in range(1, len(self._buffer) - 3):
            rest = self._buffer[skip:]
            length = _request_length(rest)
            if length and len(rest) >= length and crc16(rest[:length]) == 0:
                return skip
        return None

    def _length_by_crc(self) -> int | None:
        for length in range(4, min(len(self._buffer), self.MAX_FRAME) + 1):
            if crc16(self._buffer[: length - 2]) == struct.unpack("<H", self._buffer[length - 2 : length])[0]:
                return length
        if len(self._buffer) >= self.MAX_FRAME:
            return 1  # no frame can be this long: drop a byte (the CRC check fails)
        return None
