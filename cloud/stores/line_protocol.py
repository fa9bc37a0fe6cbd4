"""Records to InfluxDB line protocol, formatted directly.

influxdb-client's ``Point`` objects cost about nine times more than formatting the
line ourselves (measured here), so the hot path builds strings. One record becomes
one point: tags site, gateway, device; one field per value; timestamp in ms.

Escaping follows the InfluxDB line protocol reference: measurement names escape
commas and spaces; tag keys, tag values and field keys escape commas, equals signs
and spaces; string field values escape double quotes and backslashes. Values whose
quality is not good are left out (the field is absent from that point).

Records read by :class:`fieldlink.wire.BatchScanner` (the ingest hot path) carry their
values without Value objects; :class:`LineFormatter` turns each record shape once into a
``%`` template holding everything but the values and the timestamp, so a line costs one
``%`` (tests/unit/test_wire_scan.py checks that both ways give the same lines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, NamedTuple

from fieldlink.wire import Quality, Record, RecordShape, ScannedRecord, Value, ValueType

__all__ = [
    "LineFormatter",
    "LineMapping",
    "LineTemplate",
    "escape_key",
    "escape_measurement",
    "format_lines",
    "format_record",
    "line_template",
]

_INT64_MAX = 2**63 - 1
_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n"})
_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n"})


def escape_measurement(name: str) -> str:
    return name.replace("\\", "\\\\").translate(_MEASUREMENT)


@lru_cache(maxsize=65536)
def escape_key(name: str) -> str:
    """Tag keys, tag values and field keys (cached: the same few names come in every record)."""
    return name.replace("\\", "\\\\").translate(_KEY)


def _field_value(value: Value) -> str | None:
    v = value.value
    if value.type is ValueType.FLOAT:
        number = float(v)  # type: ignore[arg-type]
        if not math.isfinite(number):
            return None  # line protocol has no NaN or infinity
        return repr(number)
    if value.type is ValueType.INT:
        number = int(v)  # type: ignore[arg-type]
        # The wire allows uint64; above int64 only InfluxDB's unsigned type can hold it.
        return f"{number}u" if number > _INT64_MAX else f"{number}i"
    if value.type is ValueType.BOOL:
        return "true" if v else "false"
    text = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def format_record(record: Record, measurement: str) -> str | None:
    """One line, or None when the record has no good value to store."""
    fields = []
    for name, value in record.values.items():
        if value.quality is not Quality.GOOD or value.value is None:
            continue
        formatted = _field_value(value)
        if formatted is not None:
            fields.append(f"{escape_key(name)}={formatted}")
    if not fields:
        return None
    return f"{_head(measurement, record.site, record.gateway, record.device)} {','.join(fields)} {record.ts}"


@lru_cache(maxsize=65536)
def _head(measurement: str, site: str, gateway: str, device: str) -> str:
    """Measurement and tag set of a device's points, escaped once."""
    tags = f"site={escape_key(site)},gateway={escape_key(gateway)},device={escape_key(device)}"
    return f"{escape_measurement(measurement)},{tags}"


Identity = Literal["site", "gateway", "device"]
_TS_FACTOR = {"s": (1, 1000), "ms": (1, 1), "us": (1000, 1), "ns": (1_000_000, 1)}  # (multiply, divide) ms


@dataclass(frozen=True)
class LineMapping:
    """How a record becomes points: measurement, which identity levels are tags, units, precision.

    ``units``: ``"none"`` leaves units out; ``"field"`` adds a string field
    ``<metric>_unit`` next to each value that has one; ``"tag"`` writes one point per
    value, tagged ``unit=<unit>`` (the Telegraf layout: a series per metric and unit).
    """

    measurement: str = "fieldlink"
    tags: tuple[Identity, ...] = ("site", "gateway", "device")
    units: Literal["none", "tag", "field"] = "none"
    precision: Literal["s", "ms", "us", "ns"] = "ms"
    _measurement: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_measurement", escape_measurement(self.measurement))

    @property
    def is_default(self) -> bool:
        return self.tags == ("site", "gateway", "device") and self.units == "none" and self.precision == "ms"

    def timestamp(self, ts_ms: int) -> int:
        multiply, divide = _TS_FACTOR[self.precision]
        return ts_ms * multiply // divide


def format_lines(record: Record, mapping: LineMapping) -> list[str]:
    """The record's points under ``mapping`` (none when it has no good value)."""
    if mapping.is_default:
        line = format_record(record, mapping.measurement)
        return [] if line is None else [line]
    identity = {"site": record.site, "gateway": record.gateway, "device": record.device}
    tags = ",".join(f"{name}={escape_key(identity[name])}" for name in mapping.tags)
    head = f"{mapping._measurement},{tags}" if tags else mapping._measurement
    ts = mapping.timestamp(record.ts)
    fields: list[str] = []
    lines: list[str] = []
    for name, value in record.values.items():
        if value.quality is not Quality.GOOD or value.value is None:
            continue
        formatted = _field_value(value)
        if formatted is None:
            continue
        key = escape_key(name)
        if mapping.units == "tag":
            unit = f",unit={escape_key(value.unit)}" if value.unit else ""
            lines.append(f"{head}{unit} {key}={formatted} {ts}")
            continue
        fields.append(f"{key}={formatted}")
        if mapping.units == "field" and value.unit:
            unit_text = value.unit.replace("\\", "\\\\").replace('"', '\\"')
            fields.append(f'{escape_key(name + "_unit")}="{unit_text}"')
    if fields:
        lines.append(f"{head} {','.join(fields)} {ts}")
    return lines


class LineTemplate(NamedTuple):
    """A record shape's line as a ``%`` format: ``text % (*values, ts)``, with bools written true/false."""

    text: str
    bools: tuple[int, ...]  # positions of the bool values (``%s`` would write True/False)


_SPECIFIER = {ValueType.FLOAT: "=%r", ValueType.INT: "=%di", ValueType.BOOL: "=%s"}


def line_template(shape: RecordShape, mapping: LineMapping) -> LineTemplate | None:
    """The template of a shape's points, or None when a record needs more than one ``%`` (see format_lines).

    Units as tags write one point per value, other precisions scale the timestamp: those
    records are formatted with :func:`format_lines`. A scanned record's values are all good,
    finite and within int64 (the scanner leaves the rest to decode()), so no field is dropped.
    """
    if mapping.units == "tag" or mapping.precision != "ms":
        return None
    identity = {"site": shape.site, "gateway": shape.gateway, "device": shape.device}
    tags = ",".join(f"{name}={escape_key(identity[name])}" for name in mapping.tags)
    head = f"{mapping._measurement},{tags}" if tags else mapping._measurement
    fields = []
    for name, kind, unit in zip(shape.names, shape.types, shape.units, strict=True):
        fields.append(escape_key(name).replace("%", "%%") + _SPECIFIER[kind])
        if mapping.units == "field" and unit:
            unit_text = unit.replace("\\", "\\\\").replace('"', '\\"')
            fields.append(f'{escape_key(name + "_unit")}="{unit_text}"'.replace("%", "%%"))
    bools = tuple(i for i, kind in enumerate(shape.types) if kind is ValueType.BOOL)
    return LineTemplate(f"{head.replace('%', '%%')} {','.join(fields)} %d", bools)


_NOT_YET = object()


class LineFormatter:
    """Lines for Records and ScannedRecords under one mapping; templates are kept on the shapes."""

    def __init__(self, mapping: LineMapping) -> None:
        self.mapping = mapping
        self._key = object()  # this formatter's entry in RecordShape.formats

    def lines(self, records: Sequence[Record | ScannedRecord]) -> list[str]:
        """One entry per record, in order: its line; its lines joined by newlines (units as tags);
        an empty string when it has no good value."""
        mapping, key = self.mapping, self._key
        out: list[str] = []
        append = out.append
        for record in records:
            if type(record) is ScannedRecord:
                shape, _, args = record
                template: Any = shape.formats.get(key, _NOT_YET)
                if template is _NOT_YET:
                    template = shape.formats[key] = line_template(shape, mapping)
                if template is not None:
                    text, bools = template
                    if bools:
                        args = args.copy()  # shared with the rest of the pipeline
                        for i in bools:
                            args[i] = "true" if args[i] else "false"
                    append(text % tuple(args))
                    continue
                record = record.record()  # noqa: PLW2901 (the same record, with Value objects)
            append("\n".join(format_lines(record, mapping)))  # type: ignore[arg-type]
        return out
