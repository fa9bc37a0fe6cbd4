"""Request coalescing: a device's tags merged into as few reads as possible.

Tags of one table whose addresses touch, overlap or lie at most ``max_gap`` unused
registers apart share one read, up to ``max_count`` registers (bits for coils and
discrete inputs, whose limit is 2000). Addresses here are wire addresses (0-based).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.sources.modbus.config import BIT_TABLES, MAX_BITS_PER_READ, RegisterConfig

__all__ = ["ReadBlock", "plan_reads"]

TABLE_ORDER = ("coil", "discrete_input", "holding", "input")


@dataclass(frozen=True)
class ReadBlock:
    """One request on the wire and the tags it serves."""

    table: str
    start: int
    count: int
    tags: tuple[RegisterConfig, ...]
    offsets: tuple[int, ...]  # each tag's first register (or bit) within the block


def plan_reads(
    registers: Sequence[RegisterConfig],
    *,
    address_base: int = 0,
    max_count: int = 125,
    max_gap: int = 0,
) -> list[ReadBlock]:
    """Merge tags into reads; every tag is served by exactly one block."""
    blocks: list[ReadBlock] = []
    for table in TABLE_ORDER:
        limit = MAX_BITS_PER_READ if table in BIT_TABLES else max_count
        tags = sorted((r for r in registers if r.table == table), key=lambda r: r.address)
        current: list[RegisterConfig] = []
        start = end = 0
        for tag in tags:
            tag_start = tag.address - address_base
            tag_end = tag_start + tag.width
            if current and tag_start <= end + max_gap and max(end, tag_end) - start <= limit:
                current.append(tag)
                end = max(end, tag_end)
                continue
            if current:
                blocks.append(_block(table, start, end, current, address_base))
            current, start, end = [tag], tag_start, tag_end
        if current:
            blocks.append(_block(table, start, end, current, address_base))
    return blocks


def _block(table: str, start: int, end: int, tags: list[RegisterConfig], base: int) -> ReadBlock:
    offsets = tuple(t.address - base - start for t in tags)
    return ReadBlock(table, start, end - start, tuple(tags), offsets)
