"""The four tables of one simulated unit, answering address ranges from live registers.

Nothing is stored but what clients wrote: a read asks each register it covers for
its words at that instant. A request touching an address no register covers is an
"illegal address", as on a device whose map has gaps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .codec import BIT_TABLES
from .signals import LiveRegister, Table

__all__ = ["UnitMemory"]


class UnitMemory:
    """Registers of one unit indexed by table and address."""

    def __init__(self, registers: Sequence[LiveRegister]) -> None:
        self.registers = list(registers)
        # address -> the registers covering it: one, or several bools sharing a word.
        self._at: dict[Table, dict[int, list[LiveRegister]]] = {
            "coil": {},
            "discrete_input": {},
            "holding": {},
            "input": {},
        }
        for reg in self.registers:
            for address in range(reg.address, reg.end + 1):
                self._at[reg.table].setdefault(address, []).append(reg)

    def _covering(self, table: Table, address: int, count: int) -> list[LiveRegister] | None:
        """The registers touched by ``address..address+count-1``, each once; None on a gap."""
        index = self._at[table]
        touched: dict[int, LiveRegister] = {}
        for a in range(address, address + count):
            regs = index.get(a)
            if regs is None:
                return None
            for reg in regs:
                touched[id(reg)] = reg
        return list(touched.values())

    def read_words(self, table: Table, address: int, count: int, t: float) -> list[int] | None:
        regs = self._covering(table, address, count)
        if regs is None or table in BIT_TABLES:
            return None
        # Whole values at one instant, even when the request covers half of a 32-bit one.
        words: dict[int, int] = {}
        for reg in regs:
            if reg.bit is not None:
                words[reg.address] = words.get(reg.address, 0) | (reg.words(t)[0] & 1) << reg.bit
            else:
                words.update(zip(range(reg.address, reg.end + 1), reg.words(t), strict=True))
        return [words[a] for a in range(address, address + count)]

    def read_bits(self, table: Table, address: int, count: int, t: float) -> list[bool] | None:
        regs = self._covering(table, address, count)
        if regs is None or table not in BIT_TABLES:
            return None
        bits = {reg.address: bool(reg.words(t)[0]) for reg in regs}
        return [bits[a] for a in range(address, address + count)]

    def write_words(self, address: int, values: Sequence[int], t: float) -> list[LiveRegister] | None:
        """Pin the holding registers a client wrote; None (nothing written) on a gap.

        A word of a multi-word value the client did not write keeps its value of this
        instant; a bool in a register takes its bit of the written word (other bits
        of that word, which no register defines, read as 0 afterwards).
        """
        regs = self._covering("holding", address, len(values))
        if regs is None:
            return None
        written = dict(enumerate(values, start=address))
        for reg in regs:
            if reg.bit is not None:
                reg.written = [(written[reg.address] >> reg.bit) & 1]
                continue
            words = reg.words(t)
            reg.written = [written.get(reg.address + i, word) for i, word in enumerate(words)]
        return regs

    def write_bits(self, address: int, values: Iterable[bool]) -> list[LiveRegister] | None:
        """Pin the coils a client wrote; None (nothing written) on a gap."""
        bits = list(values)
        regs = self._covering("coil", address, len(bits))
        if regs is None:
            return None
        for reg in regs:
            reg.written = [int(bits[reg.address - address])]
        return regs
