"""Checks across the keys of one device's registers: what the schema alone cannot see.

Types against tables (a coil holds a bool), keys that only some types take
(``length``, ``bit``, 64-bit byte orders), signals against types (a string needs
a text), overlaps, and bounds of signals. Every problem names its dotted key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fieldlink.configkit import Problem

from .codec import BIT_TABLES
from .signal_specs import ConstantSignal, RampSignal, RandomWalkSignal, StepSignal

if TYPE_CHECKING:
    from .config import Register

__all__ = ["check_registers"]

_64_BIT = frozenset({"int64", "uint64", "float64"})


def _check_shape(here: str, reg: Register) -> list[Problem]:
    """Type against table, and the keys only some types take."""
    problems = []
    in_bits = reg.table in BIT_TABLES
    if in_bits and reg.type != "bool":
        problems.append(Problem(f"{here}.type", f"a {reg.table} holds a bool, got {reg.type!r}"))
    if reg.type == "bool" and not in_bits and reg.bit is None:
        message = f"required key is missing (a bool in the {reg.table} table is one bit of a register: 0..15)"
        problems.append(Problem(f"{here}.bit", message))
    if reg.bit is not None and (reg.type != "bool" or in_bits):
        problems.append(Problem(f"{here}.bit", "only a bool in a holding or input register has a bit"))
    if reg.type == "string" and reg.length is None:
        problems.append(Problem(f"{here}.length", "required key is missing (a string's size in registers)"))
    if reg.type != "string" and reg.length is not None:
        problems.append(Problem(f"{here}.length", f"only a string has a length, not {reg.type}"))
    if len(reg.byte_order) == 8 and reg.type not in _64_BIT:
        message = f"{reg.byte_order} names the bytes of a 64-bit value; {reg.type} takes ABCD, CDAB, BADC or DCBA"
        problems.append(Problem(f"{here}.byte_order", message))
    last = reg.address + reg.width - 1
    if last > 0xFFFF:
        message = f"{reg.type} takes addresses {reg.address}..{last}, past the last one (65535)"
        problems.append(Problem(f"{here}.address", message))
    return problems


def _check_signal(here: str, reg: Register) -> list[Problem]:
    """The signal against the type, and the signal's own bounds."""
    signal, key = reg.signal, f"{here}.signal"
    text = isinstance(signal, ConstantSignal) and isinstance(signal.value, str)
    if reg.type == "string":
        if not text:
            return [Problem(key, 'a string register needs a constant text: { kind = "constant", value = "..." }')]
        value = str(signal.value)  # type: ignore[union-attr]  # text implies a ConstantSignal
        if not value.isascii():
            return [Problem(f"{key}.value", f"must be ASCII, got {value!r}")]
        if reg.length is not None and len(value) > 2 * reg.length:
            message = f"{len(value)} characters do not fit {reg.length} registers (2 characters each)"
            return [Problem(f"{key}.value", message)]
        return []
    if text:
        return [Problem(f"{key}.value", f"expected a number for a {reg.type}, got {signal.value!r}")]  # type: ignore[union-attr]
    if isinstance(signal, RampSignal | RandomWalkSignal):
        kind = "a ramp wraps" if isinstance(signal, RampSignal) else "a random walk reflects"
        if isinstance(signal, RampSignal) and (signal.min is None) != (signal.max is None):
            missing = "min" if signal.min is None else "max"
            return [Problem(f"{key}.{missing}", f"{kind} between min and max: set both or neither")]
        if signal.min is not None and signal.max is not None and signal.max <= signal.min:
            return [Problem(f"{key}.max", f"must be > min ({signal.min}), got {signal.max}")]
    if isinstance(signal, StepSignal) and isinstance(signal.hold, list) and len(signal.hold) != len(signal.values):
        message = f"one duration per value: {len(signal.values)} values, {len(signal.hold)} durations"
        return [Problem(f"{key}.hold", message)]
    return []


def _overlap(reg: Register, other: Register) -> str | None:
    """Why ``reg`` collides with ``other``, or None."""
    if other.table != reg.table:
        return None
    last, other_last = reg.address + reg.width - 1, other.address + other.width - 1
    if reg.address > other_last or other.address > last:
        return None
    if reg.bit is not None and other.bit is not None:  # bools sharing one word
        return None if reg.bit != other.bit else f"bit {reg.bit} of address {reg.address} is already used by"
    return "overlaps"


def check_registers(key: str, registers: Sequence[Register]) -> list[Problem]:
    problems: list[Problem] = []
    for i, reg in enumerate(registers):
        here = f"{key}.registers[{i}]"
        problems.extend(_check_shape(here, reg))
        for j, other in enumerate(registers[:i]):
            if (why := _overlap(reg, other)) is not None:
                where = "" if why != "overlaps" else f" (addresses {other.address}..{other.address + other.width - 1})"
                problems.append(Problem(f"{here}.address", f"{why} registers[{j}]{where}"))
                break
        problems.extend(_check_signal(here, reg))
    return problems
