"""The wire contract between gateways and the cloud: topic tree and envelopes.

Both ``gateway`` and ``cloud`` import this module and nothing else defines topics
or payload layouts. ``docs/wire-contract.md`` describes the same thing for people
writing their own producers or consumers; keep the two in step.

Topic tree (``site``, ``gateway`` and ``device`` are single topic levels)::

    fl/{site}/{gateway}/status                    retained gateway state (JSON), also the last will
    fl/{site}/{gateway}/health                    gateway counters (JSON), periodic
    fl/{site}/{gateway}/batch                     batch envelope: many records of this gateway
    fl/{site}/{gateway}/dev/{device}/telemetry    record envelope: one poll of one device
    fl/{site}/{gateway}/dev/{device}/status       retained device state (JSON)
    fl/{site}/{gateway}/dev/{device}/cmd          commands to the device (JSON)
    fl/{site}/{gateway}/dev/{device}/cmd/result   command results (JSON)

Envelopes are msgpack maps by default, JSON objects optionally; a decoder tells them
apart by the first byte (``{`` is JSON, a msgpack map never starts with it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any, Final, NamedTuple

import msgpack

__all__ = [
    "BATCH_FILTER",
    "PROTOCOL_VERSION",
    "TELEMETRY_FILTER",
    "BatchJoiner",
    "BatchScanner",
    "Command",
    "Encoding",
    "Quality",
    "Record",
    "RecordShape",
    "ScannedRecord",
    "Topic",
    "TopicKind",
    "Value",
    "WireError",
    "as_record",
    "check_topic_level",
    "decode",
    "decode_command",
    "decode_state",
    "encode_batch",
    "encode_command_result",
    "encode_record",
    "encode_state",
    "topic",
]

PROTOCOL_VERSION: Final = 1
ROOT: Final = "fl"

TELEMETRY_FILTER: Final = f"{ROOT}/+/+/dev/+/telemetry"
BATCH_FILTER: Final = f"{ROOT}/+/+/batch"

_U64_MAX: Final = 2**64 - 1
_I64_MIN: Final = -(2**63)


class WireError(ValueError):
    """A payload or topic does not follow the contract; the message says how."""


class Encoding(StrEnum):
    MSGPACK = "msgpack"
    JSON = "json"


class Quality(StrEnum):
    GOOD = "good"
    BAD = "bad"  # the device answered with an error, or the value could not be decoded
    UNCERTAIN = "uncertain"


class ValueType(StrEnum):
    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    STRING = "str"


Scalar = bool | int | float | str


class Value(NamedTuple):
    """One typed measurement. ``value`` is None only when ``quality`` is not good.

    A named tuple rather than a frozen dataclass: a gateway builds thousands a second
    (one per tag per poll), and a tuple is built in a third of the time.
    """

    value: Scalar | None
    unit: str | None = None
    quality: Quality = Quality.GOOD
    type: ValueType = ValueType.FLOAT

    @classmethod
    def of(cls, value: Scalar, unit: str | None = None) -> Value:
        """A good value whose wire type follows its Python type."""
        return cls(value, unit, Quality.GOOD, _type_of(value))


def _type_of(value: Scalar) -> ValueType:
    # bool before int: bool is a subclass of int in Python.
    if isinstance(value, bool):
        return ValueType.BOOL
    if isinstance(value, int):
        return ValueType.INT
    if isinstance(value, float):
        return ValueType.FLOAT
    if isinstance(value, str):
        return ValueType.STRING
    raise WireError(f"unsupported value type {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class Record:
    """One reading of one device: what a single poll produced, stamped for delivery.

    ``(gateway, device, seq)`` identifies a record for deduplication; ``seq`` grows by
    one per record of a device and survives gateway restarts. ``ts`` is milliseconds
    since the Unix epoch (UTC), taken when the device was read.
    """

    site: str
    gateway: str
    device: str
    seq: int
    ts: int
    values: Mapping[str, Value]


# --- topics -----------------------------------------------------------------------------


class TopicKind(StrEnum):
    GATEWAY_STATUS = "status"
    GATEWAY_HEALTH = "health"
    BATCH = "batch"
    TELEMETRY = "telemetry"
    DEVICE_STATUS = "device_status"
    COMMAND = "cmd"
    COMMAND_RESULT = "cmd_result"


_GATEWAY_LEVEL = {
    "status": TopicKind.GATEWAY_STATUS,
    "health": TopicKind.GATEWAY_HEALTH,
    "batch": TopicKind.BATCH,
}
_DEVICE_LEVEL = {
    "telemetry": TopicKind.TELEMETRY,
    "status": TopicKind.DEVICE_STATUS,
    "cmd": TopicKind.COMMAND,
}


@dataclass(frozen=True, slots=True)
class Topic:
    kind: TopicKind
    site: str
    gateway: str
    device: str | None = None

    def __str__(self) -> str:
        base = f"{ROOT}/{self.site}/{self.gateway}"
        if self.device is None:
            return f"{base}/{self.kind.value}"
        suffix = {
            TopicKind.TELEMETRY: "telemetry",
            TopicKind.DEVICE_STATUS: "status",
            TopicKind.COMMAND: "cmd",
            TopicKind.COMMAND_RESULT: "cmd/result",
        }[self.kind]
        return f"{base}/dev/{self.device}/{suffix}"

    @classmethod
    def parse(cls, name: str) -> Topic:
        """The parts of a topic name of the tree, or WireError."""
        parts = name.split("/")
        if len(parts) < 4 or parts[0] != ROOT:
            raise WireError(f"topic {name!r} is not under {ROOT}/<site>/<gateway>/")
        site, gateway = parts[1], parts[2]
        levels = [site, gateway, parts[4]] if len(parts) >= 6 and parts[3] == "dev" else [site, gateway]
        for level in levels:
            try:
                check_topic_level(level)
            except ValueError as exc:
                raise WireError(f"topic {name!r}: a level {exc}") from None
        if len(parts) == 4 and parts[3] in _GATEWAY_LEVEL:
            return cls(_GATEWAY_LEVEL[parts[3]], site, gateway)
        if len(parts) >= 6 and parts[3] == "dev":
            device, rest = parts[4], "/".join(parts[5:])
            if rest in _DEVICE_LEVEL:
                return cls(_DEVICE_LEVEL[rest], site, gateway, device)
            if rest == "cmd/result":
                return cls(TopicKind.COMMAND_RESULT, site, gateway, device)
        raise WireError(f"topic {name!r} is not part of the fieldlink topic tree")


def topic(kind: TopicKind, site: str, gateway: str, device: str | None = None) -> str:
    return str(Topic(kind, site, gateway, device))


def check_topic_level(name: str) -> str:
    """Names used as topic levels (site, gateway, device) must be usable as one level."""
    if not name:
        raise ValueError("must not be empty")
    bad = [c for c in ("/", "+", "#", "\x00") if c in name]
    if bad:
        raise ValueError(f"must not contain {' '.join(repr(c) for c in bad)}, got {name!r}")
    if name.startswith("$"):
        raise ValueError(f"must not start with '$', got {name!r}")
    return name


# --- envelopes --------------------------------------------------------------------------
#
# record: {"ver": 1, "kind": "record", "site", "gw", "dev", "seq", "ts", "vals": {...}}
# batch:  {"ver": 1, "kind": "batch", "site", "gw", "recs": [{"dev", "seq", "ts", "vals"}, ...]}
# value:  {"t": "float"|"int"|"bool"|"str", "v": <value or null>, "u": unit?, "q": quality?}


def _value_to_wire(value: Value, for_json: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"t": value.type.value, "v": value.value}
    if for_json and isinstance(value.value, float) and not math.isfinite(value.value):
        # JSON has no NaN or Infinity; the type tag tells the decoder to read it back.
        entry["v"] = repr(value.value)
    if value.unit:
        entry["u"] = value.unit
    if value.quality is not Quality.GOOD:
        entry["q"] = value.quality.value
    return entry


def _record_body(record: Record, for_json: bool) -> dict[str, Any]:
    return {
        "dev": record.device,
        "seq": record.seq,
        "ts": record.ts,
        "vals": {name: _value_to_wire(v, for_json) for name, v in record.values.items()},
    }


def _pack(envelope: dict[str, Any], encoding: Encoding) -> bytes:
    if encoding is Encoding.JSON:
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return msgpack.packb(envelope, use_bin_type=True)


def encode_record(record: Record, encoding: Encoding = Encoding.MSGPACK) -> bytes:
    envelope = {"ver": PROTOCOL_VERSION, "kind": "record", "site": record.site, "gw": record.gateway}
    envelope.update(_record_body(record, encoding is Encoding.JSON))
    return _pack(envelope, encoding)


def encode_batch(site: str, gateway: str, records: Iterable[Record], encoding: Encoding = Encoding.MSGPACK) -> bytes:
    """Many records of one gateway in one message. Every record must belong to ``gateway``."""
    bodies = []
    for record in records:
        if record.gateway != gateway or record.site != site:
            raise WireError(f"record of {record.site}/{record.gateway} in a batch of {site}/{gateway}")
        bodies.append(_record_body(record, encoding is Encoding.JSON))
    envelope = {"ver": PROTOCOL_VERSION, "kind": "batch", "site": site, "gw": gateway, "recs": bodies}
    return _pack(envelope, encoding)


class BatchJoiner:
    """Joins encoded record envelopes of one gateway into a batch envelope without decoding them.

    A record envelope is the header fields (ver, kind, site, gw) followed by the four body
    fields, so its body is the payload minus a prefix that is the same for every record
    of this gateway; a batch is a header and the list of bodies. That makes replaying a
    backlog in batches a matter of slicing bytes. A payload without the expected prefix
    (the other encoding, or another writer) is decoded and re-encoded instead.
    """

    def __init__(self, site: str, gateway: str, encoding: Encoding = Encoding.MSGPACK) -> None:
        self.site, self.gateway, self.encoding = site, gateway, encoding
        if encoding is Encoding.MSGPACK:
            fields = b"".join(msgpack.packb(x) for x in ("ver", PROTOCOL_VERSION, "kind"))
            place = b"".join(msgpack.packb(x) for x in ("site", site, "gw", gateway))
            self._record_prefix = b"\x88" + fields + msgpack.packb("record") + place
            self._batch_head = b"\x85" + fields + msgpack.packb("batch") + place + msgpack.packb("recs")
            self._body_start = b"\x84"
        else:
            place = f'"site":{json.dumps(site, ensure_ascii=False)},"gw":{json.dumps(gateway, ensure_ascii=False)}'
            self._record_prefix = f'{{"ver":{PROTOCOL_VERSION},"kind":"record",{place},'.encode()
            self._batch_head = f'{{"ver":{PROTOCOL_VERSION},"kind":"batch",{place},"recs":['.encode()
            self._body_start = b"{"
        self.reencoded = 0  # payloads that needed the slow path

    def body(self, payload: bytes) -> bytes:
        """The record body of one record envelope, in this joiner's encoding."""
        if payload.startswith(self._record_prefix):
            return self._body_start + payload[len(self._record_prefix) :]
        self.reencoded += 1
        (record,) = decode(payload)
        if (record.site, record.gateway) != (self.site, self.gateway):
            raise WireError(f"record of {record.site}/{record.gateway} in a batch of {self.site}/{self.gateway}")
        return _pack(_record_body(record, self.encoding is Encoding.JSON), self.encoding)

    def join(self, bodies: Sequence[bytes]) -> bytes:
        """A batch envelope from record bodies (see :meth:`body`)."""
        if self.encoding is Encoding.JSON:
            return self._batch_head + b",".join(bodies) + b"]}"
        n = len(bodies)
        count = bytes([0x90 | n]) if n < 16 else (b"\xdc" + n.to_bytes(2, "big") if n < 65536 else None)
        if count is None:
            raise WireError(f"a batch holds at most 65535 records, got {n}")
        return self._batch_head + count + b"".join(bodies)


def _unpack(payload: bytes) -> Any:
    if not payload:
        raise WireError("empty payload")
    try:
        if payload[:1] == b"{":
            return json.loads(payload)
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, UnicodeDecodeError) as exc:
        what = "JSON" if payload[:1] == b"{" else "msgpack"
        raise WireError(f"undecodable payload: not valid {what} ({exc or type(exc).__name__})") from None
    except RecursionError:
        raise WireError("undecodable payload: nested too deeply") from None


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise WireError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _name(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = _field(obj, key, str, where)
    try:
        return check_topic_level(value)
    except ValueError as exc:
        raise WireError(f"{where}: {key!r} {exc}") from None


_TYPES: Final = {t.value: t for t in ValueType}
_new_tuple = tuple.__new__
_FLOAT, _INT, _BOOL, _STRING, _GOOD = ValueType.FLOAT, ValueType.INT, ValueType.BOOL, ValueType.STRING, Quality.GOOD


def _good_value(raw: Any) -> Value | None:
    """The common case, checked with plain dict and type lookups: a good value of its own type.

    Anything else (a bad quality, an int sent for a float, a wrong type) returns None
    and goes through ``_value_from_wire``, which checks it in full and says what is wrong.
    A cloud worker decodes every value of every record: this path is most of its time.
    """
    if type(raw) is not dict:
        return None
    q = raw.get("q")
    unit = raw.get("u")
    if (q is not None and q != "good") or (unit is not None and type(unit) is not str):
        return None
    kind = _TYPES.get(raw.get("t"))  # type: ignore[arg-type]
    value = raw.get("v")
    kind_of_value = type(value)
    # tuple.__new__ directly: a NamedTuple's own __new__ is a Python function, 3x slower.
    if kind is _FLOAT and kind_of_value is float:
        return _new_tuple(Value, (value, unit, _GOOD, _FLOAT))  # type: ignore[no-any-return]
    if kind is _INT and kind_of_value is int and _I64_MIN <= value <= _U64_MAX:
        return _new_tuple(Value, (value, unit, _GOOD, _INT))  # type: ignore[no-any-return]
    if (kind is _BOOL and kind_of_value is bool) or (kind is _STRING and kind_of_value is str):
        return _new_tuple(Value, (value, unit, _GOOD, kind))  # type: ignore[no-any-return]
    return None


def _value_from_wire(raw: Any, where: str) -> Value:
    if not isinstance(raw, Mapping):
        raise WireError(f"{where}: value entry is not a map")
    type_tag = _field(raw, "t", str, where)
    try:
        kind = ValueType(type_tag)
    except ValueError:
        raise WireError(f"{where}: unknown value type {type_tag!r}") from None
    quality_raw = raw.get("q", Quality.GOOD.value)
    try:
        quality = Quality(quality_raw)
    except ValueError:
        raise WireError(f"{where}: unknown quality {quality_raw!r}") from None
    unit = raw.get("u")
    if unit is not None and not isinstance(unit, str):
        raise WireError(f"{where}: unit is not a string")
    value = raw.get("v")
    if value is None:
        if quality is Quality.GOOD:
            raise WireError(f"{where}: a good value must not be null")
        return Value(None, unit, quality, kind)
    return Value(_typed(kind, value, where), unit, quality, kind)


def _typed(kind: ValueType, value: Any, where: str) -> Scalar:
    if kind is ValueType.BOOL and isinstance(value, bool):
        return value
    if kind is ValueType.INT and isinstance(value, int) and not isinstance(value, bool):
        if not _I64_MIN <= value <= _U64_MAX:
            raise WireError(f"{where}: integer out of 64-bit range")
        return value
    if kind is ValueType.FLOAT:
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if value in ("nan", "inf", "-inf"):
            return float(value)
    if kind is ValueType.STRING and isinstance(value, str):
        return value
    raise WireError(f"{where}: value {value!r} is not of type {kind.value}")


def _record_from_wire(body: Any, site: str, gateway: str, where: str) -> Record:
    if not isinstance(body, Mapping):
        raise WireError(f"{where}: record is not a map")
    seq = _field(body, "seq", int, where)
    if not 0 <= seq <= _U64_MAX:
        raise WireError(f"{where}: seq out of range")
    vals = _field(body, "vals", Mapping, where)
    values = {}
    for name, raw in vals.items():
        if type(name) is not str or not name:
            raise WireError(f"{where}: value names must be non-empty strings")
        value = _good_value(raw)
        values[name] = value if value is not None else _value_from_wire(raw, f"{where}.vals.{name}")
    return Record(
        site=site,
        gateway=gateway,
        device=_name(body, "dev", where),
        seq=seq,
        ts=_field(body, "ts", int, where),
        values=values,
    )


def decode(payload: bytes) -> list[Record]:
    """Records from a record or batch envelope in either encoding; WireError says what is wrong."""
    envelope = _unpack(payload)
    if not isinstance(envelope, Mapping):
        raise WireError("envelope is not a map")
    version = envelope.get("ver")
    if version != PROTOCOL_VERSION or isinstance(version, bool):  # True == 1 in Python
        raise WireError(f"unsupported envelope version {version!r} (this side speaks {PROTOCOL_VERSION})")
    site = _name(envelope, "site", "envelope")
    gateway = _name(envelope, "gw", "envelope")
    kind = envelope.get("kind")
    if kind == "record":
        return [_record_from_wire(envelope, site, gateway, "record")]
    if kind == "batch":
        bodies = _field(envelope, "recs", list, "batch")
        try:
            return [_record_from_wire(b, site, gateway, "batch.recs") for b in bodies]
        except WireError:
            # Say which record: decode again, numbering them (only bad batches pay for it).
            return [_record_from_wire(b, site, gateway, f"batch.recs[{i}]") for i, b in enumerate(bodies)]
    raise WireError(f"unknown envelope kind {kind!r}")


# --- batch envelopes read straight from their bytes (the cloud's hot path) ---------------
#
# A cloud worker spends most of its time on batch envelopes, and nearly all of them come
# from our own gateways: msgpack written by this module, each device's record laid out the
# same way poll after poll. BatchScanner learns from records decode() accepted the exact
# bytes of such a record, with holes where seq, ts and the values go, compiles them into a
# regular expression, and then reads records of that shape by matching the bytes and
# unpacking only the holes: no dict per value, no Value, no Record (about 4x less CPU).
# It only ever recognises. Whatever it does not recognise in full (a new device or value,
# a bad quality, NaN, a string value, JSON, another producer's byte layout) returns None,
# and the caller uses decode(), which has the last word and says what is wrong.

_MSGPACK_UINT: Final = rb"[\x00-\x7f]|\xcc.|\xcd..|\xce....|\xcf.{8}"
_MSGPACK_INT: Final = _MSGPACK_UINT + rb"|[\xe0-\xff]|\xd0.|\xd1..|\xd2....|\xd3.{8}"
# Holes by value type. Ints above int64 (InfluxDB's unsigned type) and non-finite floats
# (exponent bits all set: left out of points) are rare and handled by decode().
_HOLES: Final = {
    ValueType.FLOAT: rb"\xcb(?![\x7f\xff][\xf0-\xff]).{8}",
    ValueType.INT: rb"[\x00-\x7f\xe0-\xff]|\xcc.|\xcd..|\xce....|\xcf[\x00-\x7f].{7}|\xd0.|\xd1..|\xd2....|\xd3.{8}",
    ValueType.BOOL: rb"[\xc2\xc3]",
}
_PYTHON_TYPES: Final = {ValueType.FLOAT: float, ValueType.INT: int, ValueType.BOOL: bool}
_BATCH_START: Final = b"\x85" + b"".join(msgpack.packb(x) for x in ("ver", PROTOCOL_VERSION, "kind", "batch", "site"))
_RECORD_START: Final = b"\x84" + msgpack.packb("dev")  # a record body: {"dev", "seq", "ts", "vals"}


def _packed(*objects: Any) -> bytes:
    return b"".join(msgpack.packb(o, use_bin_type=True) for o in objects)


@dataclass(frozen=True, slots=True, eq=False)
class RecordShape:
    """Everything about one device's records but seq, ts and the values: names, types, units.

    Compared by identity (a scanner makes one per shape), so it is a cheap dict key.
    ``formats`` is for consumers to keep what they derive from a shape (a store's line
    template), so it lives and dies with the shape.
    """

    site: str
    gateway: str
    device: str
    names: tuple[str, ...]
    types: tuple[ValueType, ...]
    units: tuple[str | None, ...]
    pattern: re.Pattern[bytes] = field(repr=False)  # the body after the device name
    holes: tuple[int, ...] = field(repr=False)  # group numbers: the values, ts, then seq
    array_head: bytes = field(repr=False)  # msgpack array header for the holes
    series: tuple[str, str, str] = field(repr=False)  # (site, gateway, device): the dedup key
    formats: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, record: Record) -> RecordShape | None:
        """The shape of a decoded record, or None when the scanner must leave such records to decode()."""
        values = record.values.values()
        if not values or any(
            v.quality is not Quality.GOOD or _PYTHON_TYPES.get(v.type) is not type(v.value) for v in values
        ):
            return None
        names = tuple(record.values)
        types = tuple(v.type for v in values)
        units = tuple(v.unit for v in values)
        return cls(
            record.site,
            record.gateway,
            record.device,
            names,
            types,
            units,
            _body_pattern(names, types, units),
            (*range(3, len(names) + 3), 2, 1),
            msgpack.Packer().pack_array_header(len(names) + 2),
            (record.site, record.gateway, record.device),
        )


@lru_cache(maxsize=4096)
def _body_pattern(
    names: tuple[str, ...], types: tuple[ValueType, ...], units: tuple[str | None, ...]
) -> re.Pattern[bytes]:
    """What follows the device name in a record body of these values, as _record_body() and
    _value_to_wire() write it: the decoded fields as literals, seq, ts and the values as holes.

    Devices of one model share it: compiling takes milliseconds, matching a microsecond.
    """
    parts = [re.escape(_packed("seq")), b"(" + _MSGPACK_UINT + b")", re.escape(_packed("ts"))]
    parts += [b"(" + _MSGPACK_INT + b")", re.escape(_packed("vals") + _map_head(len(names)))]
    for name, kind, unit in zip(names, types, units, strict=True):
        head = _packed(name) + _map_head(2 if unit is None else 3) + _packed("t", kind.value, "v")
        parts += [re.escape(head), b"(" + _HOLES[kind] + b")"]
        if unit is not None:
            parts.append(re.escape(_packed("u", unit)))
    return re.compile(b"".join(parts), re.DOTALL)


def _map_head(n: int) -> bytes:
    return msgpack.Packer().pack_map_header(n)  # type: ignore[no-any-return]


class ScannedRecord(NamedTuple):
    """A record read by :class:`BatchScanner`: ``args`` holds the values in shape order, then ts.

    Treat ``args`` as read-only: it is shared by everything that looks at the record.
    """

    shape: RecordShape
    seq: int
    args: list[Any]

    @property
    def site(self) -> str:
        return self.shape.site

    @property
    def gateway(self) -> str:
        return self.shape.gateway

    @property
    def device(self) -> str:
        return self.shape.device

    @property
    def ts(self) -> int:
        return self.args[-1]  # type: ignore[no-any-return]

    def record(self) -> Record:
        """The same record as decode() returns it."""
        shape = self.shape
        # zip stops at the last name: args end with ts.
        values = {
            name: _new_tuple(Value, (value, unit, _GOOD, kind))
            for name, value, unit, kind in zip(shape.names, self.args, shape.units, shape.types, strict=False)
        }
        return Record(shape.site, shape.gateway, shape.device, self.seq, self.args[-1], values)


def as_record(record: Record | ScannedRecord) -> Record:
    return record if type(record) is Record else record.record()  # type: ignore[union-attr]


def _str_end(payload: bytes, pos: int) -> int:
    """Where the msgpack string at ``pos`` ends (fixstr or str8); -1 if there is none."""
    head = payload[pos] if pos < len(payload) else 0
    if 0xA0 <= head <= 0xBF:
        end = pos + 1 + head - 0xA0
    elif head == 0xD9 and pos + 1 < len(payload):
        end = pos + 2 + payload[pos + 1]
    else:
        return -1
    return end if end <= len(payload) else -1


def _batch_head(payload: bytes) -> tuple[bytes, int, int] | None:
    """(the header up to the gateway's name, where the records start, how many) of a batch envelope."""
    if not payload.startswith(_BATCH_START):
        return None
    pos = _str_end(payload, len(_BATCH_START))
    if pos < 0 or payload[pos : pos + 3] != b"\xa2gw" or (pos := _str_end(payload, pos + 3)) < 0:
        return None
    key = payload[:pos]
    if payload[pos : pos + 5] != b"\xa4recs" or len(payload) < pos + 6:
        return None
    head = payload[pos + 5]
    if 0x90 <= head <= 0x9F:
        return key, pos + 6, head - 0x90
    if head == 0xDC and len(payload) >= pos + 8:
        return key, pos + 8, int.from_bytes(payload[pos + 6 : pos + 8], "big")
    return None


class BatchScanner:
    """Reads msgpack batch envelopes of record shapes it has learnt, without decoding them.

    ``scan`` returns ``(site, gateway, records)`` when it recognises every byte of the
    payload, else None. Then the caller decodes it with :func:`decode` and hands the
    result to ``learn``. What ``scan`` accepts, ``decode`` accepts too, with the same
    records (tests/unit/test_wire_scan.py holds the two side by side).
    """

    def __init__(self, max_shapes: int = 100_000) -> None:
        self.max_shapes = max_shapes  # past this many, forget them all and learn again
        self._gateways: dict[bytes, tuple[str, str, dict[bytes, tuple[RecordShape, ...]]]] = {}
        self._shapes = 0

    def scan(self, payload: bytes) -> tuple[str, str, list[ScannedRecord]] | None:
        head = _batch_head(payload)
        if head is None:
            return None
        key, pos, count = head
        known = self._gateways.get(key)
        if known is None:
            return None
        site, gateway, devices = known
        records: list[ScannedRecord] = []
        append, unpack, new = records.append, msgpack.unpackb, _new_tuple
        try:
            for _ in range(count):
                # The record's first bytes up to the end of the device name pick its shapes
                # (the dict key compares them); the shape's pattern matches the rest.
                length = payload[pos + 5]
                end = pos + 6 + length - 0xA0 if length < 0xC0 else pos + 7 + payload[pos + 6]
                shapes = devices.get(payload[pos:end])
                if shapes is None:
                    return None
                for shape in shapes:
                    match = shape.pattern.match(payload, end)
                    if match is not None:
                        break
                else:
                    return None
                args = unpack(shape.array_head + b"".join(match.group(*shape.holes)))
                append(new(ScannedRecord, (shape, args.pop(), args)))
                pos = match.end()
        except IndexError:  # cut short
            return None
        return (site, gateway, records) if pos == len(payload) else None

    def learn(self, payload: bytes, records: Sequence[Record]) -> None:
        """Remember the shapes of ``records``, which :func:`decode` made of ``payload``."""
        head = _batch_head(payload)
        if head is None or not records:
            return
        key = head[0]
        known = self._gateways.get(key)
        for record in records:
            prefix = _RECORD_START + _packed(record.device)
            shapes = known[2].get(prefix, ()) if known is not None else ()
            values = record.values.values()
            spec = (tuple(record.values), tuple(v.type for v in values), tuple(v.unit for v in values))
            if any((s.names, s.types, s.units) == spec for s in shapes):
                continue
            shape = RecordShape.of(record)
            if shape is None:
                continue
            if self._shapes >= self.max_shapes:
                self._gateways.clear()
                self._shapes = 0
                known, shapes = None, ()
            if known is None:
                known = self._gateways[key] = (record.site, record.gateway, {})
            # The newest first; a device rarely has more than one or two shapes.
            known[2][prefix] = (shape, *shapes[:3])
            self._shapes += 1 - len(shapes[3:])


# --- state payloads (status topics) -----------------------------------------------------
# Always JSON: they are retained and read by people, dashboards and shell tools.


def encode_state(state: str, ts: int | None, reason: str | None = None, **extra: Any) -> bytes:
    """``ts=None`` leaves the time out: a last will is written at connect time, not when it fires."""
    body: dict[str, Any] = {"state": state}
    if ts is not None:
        body["ts"] = ts
    if reason:
        body["reason"] = reason
    body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()


def decode_state(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise WireError(f"state payload is not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("state"), str):
        raise WireError("state payload has no 'state'")
    return body


# --- commands to devices (JSON both ways) ------------------------------------------------

COMMAND_OPS = ("write",)


@dataclass(frozen=True, slots=True)
class Command:
    """``{"id": "c-1", "op": "write", "tag": "setpoint", "value": 71.5}`` on ``.../dev/<device>/cmd``."""

    id: str | None
    op: str
    tag: str
    value: Scalar


class BadCommand(WireError):
    """A command that cannot be carried out as sent; ``command_id`` is its id when one was readable."""

    def __init__(self, reason: str, command_id: str | None) -> None:
        super().__init__(reason)
        self.command_id = command_id


def decode_command(payload: bytes) -> Command:
    """A command from its JSON payload; BadCommand says what is wrong."""
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise BadCommand(f"command is not JSON: {exc}", None) from None
    if not isinstance(body, dict):
        raise BadCommand("command must be a JSON object", None)
    raw_id = body.get("id")
    command_id = None if raw_id is None else str(raw_id)
    try:
        return _command(body, command_id)
    except WireError as exc:
        raise BadCommand(str(exc), command_id) from None


def _command(body: dict[str, Any], command_id: str | None) -> Command:
    if command_id is not None and (not isinstance(body["id"], str | int) or isinstance(body["id"], bool)):
        raise WireError("command id must be a string")
    op = body.get("op", "write")
    if op not in COMMAND_OPS:
        raise WireError(f"unknown op {op!r} (known: {', '.join(COMMAND_OPS)})")
    tag = body.get("tag")
    if not isinstance(tag, str) or not tag:
        raise WireError("command needs a tag (the name of the tag to write)")
    if "value" not in body:
        raise WireError("command needs a value")
    value = body["value"]
    if value is None or not isinstance(value, bool | int | float | str):
        raise WireError(f"value must be a number, true/false or a string, got {value!r}")
    return Command(command_id, op, tag, value)


def encode_command_result(
    command_id: str | None,
    status: str,
    ts: int,
    reason: str | None = None,
    **extra: Any,
) -> bytes:
    """``{"id", "status": "ok"|"error"|"timeout", "ts", "reason"?, ...}`` on ``.../cmd/result``."""
    body: dict[str, Any] = {"id": command_id, "status": status, "ts": ts}
    if reason:
        body["reason"] = reason
    body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()
