"""NMEA 0183 sentences: checksum, built-in fields of common sentences, fields picked by index.

``$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47``: the checksum
is the XOR of every character between ``$`` and ``*``, as two hex digits. The
sentence type is the address without its two-letter talker (``GGA`` of ``GPGGA``);
proprietary sentences (``$PGRMZ``) keep their whole address.

Built-in fields have fixed types and units. An empty field (no fix, sensor warming
up) gives a value of bad quality, so a field keeps its type from one sentence to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import reduce

from fieldlink.wire import ValueType
from gateway.sources.serial.config import NmeaParserConfig
from gateway.sources.serial.parsers import FrameError, RawField

__all__ = ["BUILTIN_SENTENCES", "NmeaParser", "checksum", "sentence_type"]


def checksum(body: str) -> str:
    """The two hex digits for the characters between ``$`` and ``*``."""
    return f"{reduce(lambda acc, c: acc ^ ord(c), body, 0):02X}"


def sentence_type(address: str) -> str:
    return address if address.startswith("P") else address[2:]


def _get(fields: Sequence[str], index: int) -> str:
    return fields[index].strip() if index < len(fields) else ""


def _number(text: str) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _integer(text: str) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _coordinate(value: str, hemisphere: str) -> float | None:
    """Degrees from ``ddmm.mmmm`` (latitude) or ``dddmm.mmmm`` (longitude); south and west negative."""
    raw = _number(value)
    if raw is None or hemisphere not in {"N", "S", "E", "W"}:
        return None
    degrees = int(raw // 100) + (raw % 100) / 60
    return round(-degrees if hemisphere in {"S", "W"} else degrees, 7)


def _f(value: float | None, unit: str | None = None) -> RawField:
    return RawField(value, text=False, type=ValueType.FLOAT, unit=unit)


def _gga(f: Sequence[str]) -> dict[str, RawField]:
    return {
        "latitude": _f(_coordinate(_get(f, 2), _get(f, 3)), "deg"),
        "longitude": _f(_coordinate(_get(f, 4), _get(f, 5)), "deg"),
        "fix_quality": RawField(_integer(_get(f, 6)), text=False, type=ValueType.INT),
        "satellites": RawField(_integer(_get(f, 7)), text=False, type=ValueType.INT),
        "hdop": _f(_number(_get(f, 8))),
        "altitude": _f(_number(_get(f, 9)), "m"),
    }


def _rmc(f: Sequence[str]) -> dict[str, RawField]:
    status = _get(f, 2)
    return {
        "valid": RawField(status == "A" if status in {"A", "V"} else None, text=False, type=ValueType.BOOL),
        "latitude": _f(_coordinate(_get(f, 3), _get(f, 4)), "deg"),
        "longitude": _f(_coordinate(_get(f, 5), _get(f, 6)), "deg"),
        "speed_over_ground": _f(_number(_get(f, 7)), "kn"),
        "course_over_ground": _f(_number(_get(f, 8)), "deg"),
    }


def _hdt(f: Sequence[str]) -> dict[str, RawField]:
    return {"heading_true": _f(_number(_get(f, 1)), "deg")}


_TO_METRES_PER_SECOND = {"M": 1.0, "K": 1 / 3.6, "N": 1852 / 3600, "S": 1609.344 / 3600}


def _mwv(f: Sequence[str]) -> dict[str, RawField]:
    valid = _get(f, 5) == "A"
    speed, factor = _number(_get(f, 3)), _TO_METRES_PER_SECOND.get(_get(f, 4))
    reference = {"R": "relative", "T": "true"}.get(_get(f, 2))
    return {
        "wind_angle": _f(_number(_get(f, 1)) if valid else None, "deg"),
        "wind_reference": RawField(reference, text=False, type=ValueType.STRING),
        "wind_speed": _f(round(speed * factor, 3) if valid and speed is not None and factor else None, "m/s"),
    }


def _mtw(f: Sequence[str]) -> dict[str, RawField]:
    celsius = _get(f, 2) in {"C", ""}
    return {"water_temperature": _f(_number(_get(f, 1)) if celsius else None, "degC")}


# (transducer type, unit letter) -> unit; the letters mean different things per type.
_XDR_UNITS = {
    ("C", "C"): "degC",
    ("C", "F"): "degF",
    ("C", "K"): "K",
    ("P", "B"): "bar",
    ("P", "P"): "Pa",
    ("H", "P"): "%",
    ("A", "D"): "deg",
    ("U", "V"): "V",
    ("I", "A"): "A",
    ("F", "H"): "Hz",
    ("N", "N"): "N",
    ("T", "R"): "rpm",
    ("D", "M"): "m",
}


def _xdr(f: Sequence[str]) -> dict[str, RawField]:
    """Quadruplets (type, value, unit, name); the field is named by the transducer name."""
    fields: dict[str, RawField] = {}
    for n, i in enumerate(range(1, len(f) - 3, 4), start=1):
        kind, value, unit, name = (_get(f, i + k) for k in range(4))
        unit_name = _XDR_UNITS.get((kind, unit), unit or None)
        fields[name or f"xdr_{kind or 'X'}{n}"] = _f(_number(value), unit_name)
    return fields


BUILTIN_SENTENCES: dict[str, Callable[[Sequence[str]], dict[str, RawField]]] = {
    "GGA": _gga,
    "RMC": _rmc,
    "HDT": _hdt,
    "MWV": _mwv,
    "MTW": _mtw,
    "XDR": _xdr,
}

_EXTRACT_TYPES = {"float": ValueType.FLOAT, "int": ValueType.INT, "bool": ValueType.BOOL, "str": ValueType.STRING}


class NmeaParser:
    def __init__(self, config: NmeaParserConfig) -> None:
        self.checksum_required = config.checksum == "required"
        self.sentences = set(config.sentences) if config.sentences is not None else None
        self.builtin = config.builtin
        self.extract: dict[str, list[tuple[int, str, ValueType, str | None]]] = {}
        for item in config.extract:
            self.extract.setdefault(item.sentence, []).append(
                (item.index, item.name, _EXTRACT_TYPES[item.type], item.unit)
            )

    def parse(self, text: str) -> dict[str, RawField]:
        text = text.strip()
        if text[:1] not in {"$", "!"}:
            raise FrameError("unparsable", "not an NMEA sentence (no '$' or '!')")
        body, star, given = text[1:].partition("*")
        if not star:
            if self.checksum_required:
                raise FrameError("no_checksum", "NMEA sentence without checksum")
        elif len(given) != 2 or any(c not in "0123456789abcdefABCDEF" for c in given):
            raise FrameError("unparsable", f"checksum {given[:8]!r} is not two hex digits")
        elif given.upper() != checksum(body):
            raise FrameError("bad_checksum", f"checksum {given} does not match {checksum(body)}")
        if not body.isascii() or not body.isprintable():
            raise FrameError("unparsable", "NMEA sentence with non-printable characters")
        fields = body.split(",")
        address = fields[0]
        if len(address) < 3 or not address.isalnum():
            raise FrameError("unparsable", f"bad NMEA address {address[:10]!r}")
        kind = sentence_type(address)
        if text[0] == "!" or (self.sentences is not None and kind not in self.sentences):
            return {}  # encapsulated (AIS) or not asked for: not garbage, just not ours
        values: dict[str, RawField] = {}
        if self.builtin and (decode := BUILTIN_SENTENCES.get(kind)) is not None:
            values.update(decode(fields))
        for index, name, value_type, unit in self.extract.get(kind, ()):
            cell = _get(fields, index)
            values[name] = RawField(cell or None, type=value_type, unit=unit)
        return values
