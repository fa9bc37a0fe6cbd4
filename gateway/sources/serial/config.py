"""Config schema of the ``serial`` source: one port, one device, a framing rule and a parser.

``docs/sources-serial.md`` describes every key; ``configs/gateway-serial.toml`` is the sample.
"""

from __future__ import annotations

import codecs
import re
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from fieldlink.configkit import ByteSize, Duration, Schema, TopicLevel

__all__ = [
    "CsvParserConfig",
    "FieldConfig",
    "JsonParserConfig",
    "KvParserConfig",
    "NmeaExtract",
    "NmeaParserConfig",
    "ParserConfig",
    "RegexParserConfig",
    "SerialConfig",
    "parse_delimiter",
]

FieldType = Literal["auto", "float", "int", "bool", "str"]

_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[rnt0\\])")
_ESCAPES = {"r": "\r", "n": "\n", "t": "\t", "0": "\0", "\\": "\\"}


def parse_delimiter(value: object) -> bytes:
    r"""Bytes from a TOML string: ``"\r\n"`` (TOML escapes) or ``'\r\n'``, ``'\x03'`` (ours, in literal strings).

    Each character is one byte (latin-1), so ``"\u0003"`` is byte 3 and ``"¶"`` is 0xB6.
    """
    if isinstance(value, bytes):
        text = value.decode("latin-1")
    elif isinstance(value, str):
        text = _ESCAPE.sub(lambda m: _ESCAPES.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), value)
    else:
        raise ValueError(f"expected a string such as '\\n' or '\\r\\n', got {value!r}")
    if not text:
        raise ValueError("must not be empty")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"characters above \\xff cannot be one byte each, got {value!r}") from None


Delimiter = Annotated[bytes, BeforeValidator(parse_delimiter)]


class FieldConfig(Schema):
    """What to do with one field of a frame: rename, type, unit, ``value = raw * scale + offset``."""

    name: str | None = Field(default=None, min_length=1, description="name in the reading (default: as in the frame)")
    type: FieldType = "auto"
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0

    @model_validator(mode="after")
    def _scaling_needs_numbers(self) -> FieldConfig:
        if (self.scale != 1.0 or self.offset != 0.0) and self.type not in {"auto", "float"}:
            raise ValueError(f"scale and offset need a number field (type 'float' or 'auto'), not {self.type!r}")
        return self


class KvParserConfig(Schema):
    """``T=21.5 H=40``: pairs split by ``pair_separator`` (default: any whitespace), then ``separator``."""

    kind: Literal["kv"]
    separator: str = Field(default="=", min_length=1)
    pair_separator: str | None = Field(default=None, min_length=1)


class CsvParserConfig(Schema):
    """``21.5,40,OK``: ``columns`` names the fields in order; an empty name skips that column."""

    kind: Literal["csv"]
    columns: list[str] = Field(min_length=1)
    delimiter: str = Field(default=",", min_length=1, max_length=1)

    @field_validator("columns")
    @classmethod
    def _named(cls, columns: list[str]) -> list[str]:
        named = [c for c in columns if c]
        if not named:
            raise ValueError("at least one column needs a name (empty names skip a column)")
        if len(set(named)) != len(named):
            raise ValueError(f"column names must be unique, got {columns}")
        return columns


class JsonParserConfig(Schema):
    """One JSON object per frame; nested objects and arrays become dotted names (``wind.speed``, ``t.0``)."""

    kind: Literal["json"]


class RegexParserConfig(Schema):
    """Named groups of ``pattern`` become the fields; ``search`` finds the pattern anywhere in the frame."""

    kind: Literal["regex"]
    pattern: str = Field(min_length=1)
    match: Literal["search", "full"] = "search"

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if not compiled.groupindex:
            raise ValueError("needs at least one named group, such as (?P<temperature>[-\\d.]+)")
        return pattern

    @property
    def groups(self) -> list[str]:
        return list(re.compile(self.pattern).groupindex)


SENTENCE_TYPE = r"^[A-Z][A-Z0-9]{2,7}$"  # GGA, XDR; proprietary ones keep their whole address: PGRMZ


class NmeaExtract(Schema):
    """A field picked by position: ``index`` 1 is the first field after the sentence address."""

    sentence: str = Field(pattern=SENTENCE_TYPE, description="sentence type without talker, e.g. XDR")
    index: int = Field(ge=1)
    name: str = Field(min_length=1)
    type: Literal["float", "int", "bool", "str"] = "float"
    unit: str | None = None


class NmeaParserConfig(Schema):
    kind: Literal["nmea"]
    checksum: Literal["required", "optional"] = "required"
    sentences: list[Annotated[str, Field(pattern=SENTENCE_TYPE)]] | None = Field(
        default=None, description="sentence types to take (default: every type that yields fields)"
    )
    builtin: bool = Field(default=True, description="decode the fields of GGA, RMC, HDT, MWV, MTW, XDR")
    extract: list[NmeaExtract] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> NmeaParserConfig:
        seen: set[tuple[str, str]] = set()
        for item in self.extract:
            if (item.sentence, item.name) in seen:
                raise ValueError(f"extract name {item.name!r} is used twice for {item.sentence}")
            seen.add((item.sentence, item.name))
        return self


ParserConfig = Annotated[
    KvParserConfig | CsvParserConfig | JsonParserConfig | RegexParserConfig | NmeaParserConfig,
    Field(discriminator="kind"),
]


class DeviceName(NamedTuple):
    """The one device of a serial source, shaped like the devices of other sources (``.name``)."""

    name: str


_PARSER_KINDS = ("kv", "csv", "json", "regex", "nmea")


def _without_parser_kind(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Report ``parser.pattern``, not ``parser.regex.pattern``: the kind is a tag the user never wrote."""
    try:
        return handler(value)
    except ValidationError as exc:
        details: list[InitErrorDetails] = []
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            detail: InitErrorDetails = {
                "type": error["type"],
                "loc": loc[1:] if loc and loc[0] in _PARSER_KINDS else loc,
                "input": error["input"],
            }
            if "ctx" in error:
                detail["ctx"] = error["ctx"]
            details.append(detail)
        raise ValidationError.from_exception_data(exc.title, details) from None


class SerialConfig(Schema):
    """Checks that span keys are field validators on the later key, so errors name that key."""

    kind: Literal["serial"]
    name: str = Field(min_length=1)
    port: str = Field(min_length=1, description="e.g. /dev/ttyUSB0 or /dev/serial/by-id/...")
    device: TopicLevel
    baudrate: int = Field(default=9600, gt=0)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: Literal[1, 1.5, 2] = 1
    encoding: str = "utf-8"
    delimiter: Delimiter = b"\n"
    max_frame: ByteSize = Field(default=1024, ge=1)
    frame_length: int | None = Field(default=None, ge=1, description="fixed-length frames instead of a delimiter")
    parser: Annotated[ParserConfig, WrapValidator(_without_parser_kind)]
    fields: dict[str, FieldConfig] = Field(default_factory=dict)
    keep_unlisted: bool = Field(default=False, description="with fields set: keep the fields not listed too")
    retry_min: Duration = 1.0
    retry_max: Duration = 30.0
    silence_timeout: Duration | None = None

    @property
    def devices(self) -> list[DeviceName]:
        return [DeviceName(self.device)]

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str) -> str:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown text encoding {encoding!r}") from None
        return encoding

    @field_validator("retry_min", "silence_timeout")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError(f"must be more than 0, got {value}")
        return value

    @field_validator("retry_max")
    @classmethod
    def _not_below_min(cls, value: float, info: ValidationInfo) -> float:
        retry_min = info.data.get("retry_min")
        if retry_min is not None and value < retry_min:
            raise ValueError(f"must not be shorter than retry_min ({retry_min:g}s), got {value:g}s")
        return value

    @field_validator("frame_length")
    @classmethod
    def _one_framing(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        if info.data.get("delimiter", b"\n") != b"\n":
            raise ValueError("set either delimiter or frame_length, not both")
        max_frame = info.data.get("max_frame")
        if max_frame is not None and value > max_frame:
            raise ValueError(f"must not be more than max_frame ({max_frame}), got {value}")
        return value

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, fields: dict[str, FieldConfig], info: ValidationInfo) -> dict[str, FieldConfig]:
        names: dict[str, str] = {}
        for key, field in fields.items():
            out = field.name or key
            if out in names:
                raise ValueError(f"{names[out]!r} and {key!r} both become {out!r}")
            names[out] = key
        parser = info.data.get("parser")
        known: set[str] | None = None
        if isinstance(parser, CsvParserConfig):
            known = {c for c in parser.columns if c}
        elif isinstance(parser, RegexParserConfig):
            known = set(parser.groups)
        unknown = [key for key in fields if known is not None and key not in known]
        if unknown:
            raise ValueError(f"{unknown} not produced by the parser (it yields {sorted(known or ())})")
        return fields
