"""Raw fields to typed values: allow-list, renaming, type, unit, scale and offset.

Types are stable per field: a field's type is the configured one, else the one the
protocol fixes (NMEA), else the one its first value suggested, and it stays that
type. Numbers read from text are floats unless a field says ``type = "int"``, so
``21`` then ``21.5`` is one float field, not an int then a float. A value that
does not fit its field's type becomes a value of bad quality (counted), not a
second type.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal

from fieldlink.wire import Quality, Scalar, Value, ValueType
from gateway.sources.serial.config import FieldConfig
from gateway.sources.serial.parsers import Raw, RawField

__all__ = ["MAX_FIELDS", "FieldMapper"]

MAX_FIELDS = 256  # distinct field names one source tracks; a chattering sensor cannot grow memory

_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$|^[+-]?(?:nan|inf|infinity)$", re.IGNORECASE)
_INTEGER = re.compile(r"^[+-]?\d+$")
_TRUE = {"true", "on", "yes", "1"}
_FALSE = {"false", "off", "no", "0"}
_TYPES = {"float": ValueType.FLOAT, "int": ValueType.INT, "bool": ValueType.BOOL, "str": ValueType.STRING}
_DEFAULT = FieldConfig()


def _decimal_places(number: float) -> int:
    exponent = Decimal(repr(number)).normalize().as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def infer_type(field: RawField) -> ValueType | None:
    value = field.value
    if value is None:
        return None
    if isinstance(value, bool):
        return ValueType.BOOL
    if isinstance(value, int | float):
        return ValueType.FLOAT
    if field.text:
        if value.lower() in {"true", "false"}:
            return ValueType.BOOL
        if _NUMBER.match(value):
            return ValueType.FLOAT
    return ValueType.STRING


def convert(value: Raw, target: ValueType) -> Scalar:
    """``value`` as ``target``; ValueError if it is not one."""
    if value is None:
        raise ValueError("no value")
    if isinstance(value, str):
        return _from_text(value, target)
    if target is ValueType.STRING:
        return str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(value, bool):
        if target is ValueType.BOOL:
            return value
        raise ValueError(f"{value} is not {target.value}")
    if target is ValueType.FLOAT:
        return float(value)
    if target is ValueType.INT and float(value).is_integer():
        return int(value)
    if target is ValueType.BOOL and value in (0, 1):
        return bool(value)
    raise ValueError(f"{value!r} is not {target.value}")


def _from_text(value: str, target: ValueType) -> Scalar:
    text = value.strip()
    if target is ValueType.STRING:
        return value
    if target is ValueType.FLOAT and _NUMBER.match(text):
        return float(text)
    if target is ValueType.INT:
        if _INTEGER.match(text):
            return int(text)
        if _NUMBER.match(text) and float(text).is_integer():
            return int(float(text))
    if target is ValueType.BOOL and text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    raise ValueError(f"{value[:20]!r} is not {target.value}")


class FieldMapper:
    def __init__(self, fields: Mapping[str, FieldConfig], keep_unlisted: bool, max_fields: int = MAX_FIELDS) -> None:
        self.fields = dict(fields)
        self.keep_unlisted = keep_unlisted or not fields
        self.max_fields = max_fields
        self.bad_values = 0  # values that did not fit their field's type
        self.untracked = 0  # fields dropped because MAX_FIELDS names are already known
        self._types: dict[str, ValueType] = {}

    def map(self, raw: Mapping[str, RawField]) -> dict[str, Value]:
        values: dict[str, Value] = {}
        for key, field in raw.items():
            config = self.fields.get(key)
            if config is None:
                if not self.keep_unlisted:
                    continue
                config = _DEFAULT
            name = config.name or key
            target = self._type_of(name, config, field)
            if target is None:
                continue  # a null whose type nothing tells yet
            if name not in self._types:
                if len(self._types) >= self.max_fields:
                    self.untracked += 1
                    continue
                self._types[name] = target
            values[name] = self._value(field, config, target)
        return values

    def _type_of(self, name: str, config: FieldConfig, field: RawField) -> ValueType | None:
        if config.type != "auto":
            return _TYPES[config.type]
        return self._types.get(name) or field.type or infer_type(field)

    def _value(self, field: RawField, config: FieldConfig, target: ValueType) -> Value:
        unit = config.unit or field.unit
        try:
            value = convert(field.value, target)
        except ValueError:
            if field.value is not None:
                self.bad_values += 1
            return Value(None, unit, Quality.BAD, target)
        if target is ValueType.FLOAT and (config.scale != 1.0 or config.offset != 0.0):
            assert isinstance(value, float)
            places = _decimal_places(value) + _decimal_places(config.scale)
            value = round(value * config.scale + config.offset, min(15, max(places, _decimal_places(config.offset))))
        return Value(value, unit, Quality.GOOD, target)
