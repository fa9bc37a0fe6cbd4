"""Frame parsers: one line of text in, named raw fields out.

A parser only splits; typing, units, scaling and renaming happen afterwards in
:mod:`gateway.sources.serial.values`, the same way for every parser. A frame a
parser cannot read raises :class:`FrameError` whose ``reason`` is the counter
suffix (``dropped_<reason>``).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from fieldlink.wire import ValueType
from gateway.sources.serial.config import (
    CsvParserConfig,
    JsonParserConfig,
    KvParserConfig,
    NmeaParserConfig,
    ParserConfig,
    RegexParserConfig,
)

__all__ = [
    "CsvParser",
    "FrameError",
    "FrameParser",
    "JsonParser",
    "KvParser",
    "RawField",
    "RegexParser",
    "build_parser",
]

Raw = bool | int | float | str | None


@dataclass(frozen=True, slots=True)
class RawField:
    """A field as the frame gave it.

    ``text`` is True for characters still to be read as a number, bool or string
    (kv, csv, regex); False for values a format already typed (JSON, NMEA). ``type``
    is set when the protocol fixes the type (NMEA built-ins), ``unit`` when it knows it.
    """

    value: Raw
    text: bool = True
    type: ValueType | None = None
    unit: str | None = None


class FrameError(ValueError):
    """A frame that yields nothing; ``reason`` names its counter (unparsable, bad_checksum, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class FrameParser(Protocol):
    def parse(self, text: str) -> dict[str, RawField]:
        """Fields of one frame (an empty dict: a frame of no interest); FrameError if unreadable."""
        ...


class KvParser:
    def __init__(self, config: KvParserConfig) -> None:
        self.separator = config.separator
        self.pair_separator = config.pair_separator

    def parse(self, text: str) -> dict[str, RawField]:
        fields: dict[str, RawField] = {}
        for token in text.split(self.pair_separator):
            token = token.strip()  # noqa: PLW2901
            if not token:
                continue
            key, found, value = token.partition(self.separator)
            key = key.strip()
            if not found or not key:
                raise FrameError("unparsable", f"{token[:40]!r} is not key{self.separator}value")
            fields[key] = RawField(value.strip())
        if not fields:
            raise FrameError("unparsable", "no key=value pairs")
        return fields


class CsvParser:
    def __init__(self, config: CsvParserConfig) -> None:
        self.columns = config.columns
        self.delimiter = config.delimiter

    def parse(self, text: str) -> dict[str, RawField]:
        try:
            row = next(csv.reader([text], delimiter=self.delimiter, strict=True))
        except (csv.Error, StopIteration) as exc:
            raise FrameError("unparsable", f"not a CSV row: {exc}") from None
        if len(row) != len(self.columns):
            raise FrameError("unparsable", f"{len(row)} columns, expected {len(self.columns)}")
        return {name: RawField(cell.strip()) for name, cell in zip(self.columns, row, strict=True) if name}


def _flatten(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _flatten(child, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _flatten(child, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield prefix, node


class JsonParser:
    def __init__(self, config: JsonParserConfig) -> None:
        self.config = config

    def parse(self, text: str) -> dict[str, RawField]:
        try:
            document = json.loads(text)  # also takes NaN and Infinity, which some sensors send
        except (ValueError, RecursionError) as exc:
            raise FrameError("unparsable", f"not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise FrameError("unparsable", f"expected a JSON object, got {type(document).__name__}")
        return {name: RawField(value, text=False) for name, value in _flatten(document, "") if name}


class RegexParser:
    def __init__(self, config: RegexParserConfig) -> None:
        self.pattern = re.compile(config.pattern)
        self.full = config.match == "full"

    def parse(self, text: str) -> dict[str, RawField]:
        match = self.pattern.fullmatch(text) if self.full else self.pattern.search(text)
        if match is None:
            raise FrameError("unparsable", "does not match the pattern")
        return {name: RawField(value) for name, value in match.groupdict().items() if value is not None}


def build_parser(config: ParserConfig) -> FrameParser:
    if isinstance(config, KvParserConfig):
        return KvParser(config)
    if isinstance(config, CsvParserConfig):
        return CsvParser(config)
    if isinstance(config, JsonParserConfig):
        return JsonParser(config)
    if isinstance(config, RegexParserConfig):
        return RegexParser(config)
    if isinstance(config, NmeaParserConfig):
        from gateway.sources.serial.nmea import NmeaParser  # noqa: PLC0415 (nmea imports this module)

        return NmeaParser(config)
    raise TypeError(f"no parser for {config!r}")
