"""Serial frame parsers (kv, csv, json, regex, NMEA 0183) and the typing of their fields."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import TypeAdapter

from fieldlink.wire import Quality, Value, ValueType
from gateway.sources.serial.config import FieldConfig, ParserConfig
from gateway.sources.serial.nmea import checksum
from gateway.sources.serial.parsers import FrameError, FrameParser, RawField, build_parser
from gateway.sources.serial.values import FieldMapper

PARSER = TypeAdapter(ParserConfig)


def parser(**config: Any) -> FrameParser:
    return build_parser(PARSER.validate_python(config))


def raw(parsed: dict[str, RawField]) -> dict[str, Any]:
    return {name: field.value for name, field in parsed.items()}


def mapped(frame_parser: FrameParser, text: str, **fields: FieldConfig) -> dict[str, Value]:
    return FieldMapper(fields, keep_unlisted=False).map(frame_parser.parse(text))


def good(value: Any, type_: ValueType = ValueType.FLOAT, unit: str | None = None) -> Value:
    return Value(value, unit, Quality.GOOD, type_)


def reason(frame_parser: FrameParser, text: str) -> str:
    with pytest.raises(FrameError) as caught:
        frame_parser.parse(text)
    return caught.value.reason


# --- kv ---------------------------------------------------------------------------------


def test_kv_reads_pairs_split_by_whitespace() -> None:
    assert raw(parser(kind="kv").parse("T=21.5  H=40 status=OK")) == {"T": "21.5", "H": "40", "status": "OK"}


def test_kv_takes_custom_separators() -> None:
    kv = parser(kind="kv", separator=":", pair_separator=";")
    assert raw(kv.parse("temp: 21.5; hum:40;")) == {"temp": "21.5", "hum": "40"}


@pytest.mark.parametrize("text", ["", "   ", "garbage", "T=21.5 junk", "=5", "#@!~%^&*()<>"])
def test_kv_rejects_what_is_not_pairs(text: str) -> None:
    assert reason(parser(kind="kv"), text) == "unparsable"


# --- csv --------------------------------------------------------------------------------


def test_csv_names_columns_and_skips_unnamed_ones() -> None:
    csv = parser(kind="csv", columns=["temperature", "", "humidity"], delimiter=";")
    assert raw(csv.parse("21.5;x;40")) == {"temperature": "21.5", "humidity": "40"}


def test_csv_honours_quotes() -> None:
    csv = parser(kind="csv", columns=["name", "value"])
    assert raw(csv.parse('"tank, north",3.5')) == {"name": "tank, north", "value": "3.5"}


@pytest.mark.parametrize("text", ["21.5", "21.5,40,7", '"unterminated,4', "#@!~%^&*()"])
def test_csv_rejects_a_wrong_number_of_columns(text: str) -> None:
    assert reason(parser(kind="csv", columns=["a", "b"]), text) == "unparsable"


# --- json -------------------------------------------------------------------------------


def test_json_flattens_nested_objects_and_arrays_to_dotted_names() -> None:
    parsed = parser(kind="json").parse('{"t": 21.5, "ok": true, "id": "ws1", "wind": {"speed": 3}, "xs": [1, 2]}')
    assert raw(parsed) == {"t": 21.5, "ok": True, "id": "ws1", "wind.speed": 3, "xs.0": 1, "xs.1": 2}
    assert not any(field.text for field in parsed.values())


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "21.5", '"text"', "T=21.5", "{" * 5000 + "}" * 5000])
def test_json_rejects_what_is_not_an_object(text: str) -> None:
    assert reason(parser(kind="json"), text) == "unparsable"


def test_json_selects_and_renames_dotted_paths() -> None:
    values = mapped(
        parser(kind="json"),
        '{"wind": {"speed": 3, "dir": 270}, "t": 21}',
        **{"wind.speed": FieldConfig(name="wind_speed", unit="m/s")},
    )
    assert values == {"wind_speed": good(3.0, unit="m/s")}


# --- regex ------------------------------------------------------------------------------


def test_regex_named_groups_become_fields() -> None:
    regex = parser(kind="regex", pattern=r"T:(?P<t>-?[\d.]+)C(?: H:(?P<h>\d+)%)?")
    assert raw(regex.parse("#12 T:-3.5C H:80%")) == {"t": "-3.5", "h": "80"}
    assert raw(regex.parse("T:4C")) == {"t": "4"}  # a group that took no part is left out


def test_regex_full_match_needs_the_whole_frame() -> None:
    regex = parser(kind="regex", pattern=r"T:(?P<t>[\d.]+)", match="full")
    assert raw(regex.parse("T:4")) == {"t": "4"}
    assert reason(regex, "x T:4") == "unparsable"


# --- NMEA 0183 --------------------------------------------------------------------------

GGA = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"


def sentence(body: str) -> str:
    return f"${body}*{checksum(body)}"


RMC = sentence("GPRMC,123519,A,4807.038,S,01131.000,W,022.4,084.4,230394,003.1,W")


def test_nmea_checksum_of_the_textbook_sentence() -> None:
    assert checksum(GGA[1:].split("*", maxsplit=1)[0]) == "47"


def test_nmea_gga_builtin_fields() -> None:
    values = mapped(parser(kind="nmea"), GGA)  # no fields listed: every field is kept
    assert values == {
        "latitude": good(48.1173, unit="deg"),
        "longitude": good(11.5166667, unit="deg"),
        "fix_quality": good(1, ValueType.INT),
        "satellites": good(8, ValueType.INT),
        "hdop": good(0.9),
        "altitude": good(545.4, unit="m"),
    }


def test_nmea_rmc_south_and_west_are_negative() -> None:
    values = raw(parser(kind="nmea").parse(RMC))
    assert values["valid"] is True
    assert values["latitude"] == pytest.approx(-48.1173)
    assert values["longitude"] == pytest.approx(-11.5166667)
    assert values["speed_over_ground"] == 22.4


def test_nmea_weather_sentences() -> None:
    nmea = parser(kind="nmea")
    wind = nmea.parse(sentence("WIMWV,270.0,T,10.0,N,A"))
    assert raw(wind) == {"wind_angle": 270.0, "wind_reference": "true", "wind_speed": 5.144}
    assert wind["wind_speed"].unit == "m/s"
    assert raw(nmea.parse(sentence("YXMTW,12.5,C"))) == {"water_temperature": 12.5}
    xdr = nmea.parse(sentence("IIXDR,C,21.3,C,AIRTEMP,P,1.013,B,BARO,H,45,P,"))
    assert raw(xdr) == {"AIRTEMP": 21.3, "BARO": 1.013, "xdr_H3": 45.0}
    assert [f.unit for f in xdr.values()] == ["degC", "bar", "%"]


def test_nmea_invalid_wind_is_bad_quality_of_the_same_type() -> None:
    values = FieldMapper({}, keep_unlisted=True).map(parser(kind="nmea").parse(sentence("WIMWV,270.0,R,10.0,M,V")))
    assert values["wind_speed"] == Value(None, "m/s", Quality.BAD, ValueType.FLOAT)


def test_nmea_empty_fields_keep_their_type() -> None:
    nmea = parser(kind="nmea")
    mapper = FieldMapper({}, keep_unlisted=True)
    no_fix = mapper.map(nmea.parse(sentence("GPGGA,123519,,,,,0,00,,,M,,M,,")))
    assert no_fix["latitude"] == Value(None, "deg", Quality.BAD, ValueType.FLOAT)
    assert no_fix["fix_quality"] == good(0, ValueType.INT)
    assert mapper.bad_values == 0  # empty is "no data", not a wrong value


def test_nmea_lowercase_checksum_is_accepted() -> None:
    body = "YXMTW,12.5,C"
    assert raw(parser(kind="nmea").parse(f"${body}*{checksum(body).lower()}")) == {"water_temperature": 12.5}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(GGA.replace("*47", "*48"), "bad_checksum", id="wrong"),
        pytest.param(GGA.replace("545.4", "545.5"), "bad_checksum", id="corrupted-body"),
        pytest.param(GGA.split("*", maxsplit=1)[0], "no_checksum", id="missing"),
        pytest.param(GGA[: len(GGA) // 2], "no_checksum", id="cut-short"),
        pytest.param(GGA.replace("*47", "*4"), "unparsable", id="one-digit"),
        pytest.param(GGA.replace("*47", "*ZZ"), "unparsable", id="not-hex"),
        pytest.param("GPGGA,123519*47", "unparsable", id="no-dollar"),
        pytest.param("#@!~%^&*()<>", "unparsable", id="noise"),
        pytest.param(sentence("G\x01GA,1"), "unparsable", id="control-char"),
        pytest.param(sentence(",1,2"), "unparsable", id="no-address"),
    ],
)
def test_nmea_rejects(text: str, expected: str) -> None:
    assert reason(parser(kind="nmea"), text) == expected


def test_nmea_checksum_may_be_optional() -> None:
    nmea = parser(kind="nmea", checksum="optional")
    assert raw(nmea.parse("$YXMTW,12.5,C")) == {"water_temperature": 12.5}
    assert reason(nmea, "$YXMTW,12.5,C*00") == "bad_checksum"  # present: still checked


def test_nmea_sentence_filter_and_extract_by_index() -> None:
    nmea = parser(
        kind="nmea",
        sentences=["XDR", "VHW"],
        extract=[
            {"sentence": "VHW", "index": 5, "name": "water_speed", "unit": "kn"},
            {"sentence": "XDR", "index": 2, "name": "first_value"},
        ],
    )
    assert nmea.parse(GGA) == {}  # a sentence not asked for: ignored, not an error
    assert nmea.parse("!AIVDM,1,1,,A,13aEOK?P00PD2wVMdLDRhgvL289?,0*26") == {}
    values = FieldMapper({}, keep_unlisted=True).map(nmea.parse(sentence("VWVHW,,T,,M,3.5,N,6.5,K")))
    assert values == {"water_speed": good(3.5, unit="kn")}
    assert raw(nmea.parse(sentence("IIXDR,C,21.3,C,AIR")))["first_value"] == "21.3"


def test_nmea_builtin_fields_can_be_switched_off() -> None:
    assert parser(kind="nmea", builtin=False).parse(GGA) == {}


# --- typing: allow-list, rename, scale, type stability ----------------------------------


def test_numbers_from_text_are_floats_so_a_field_keeps_its_type() -> None:
    mapper = FieldMapper({}, keep_unlisted=True)
    kv = parser(kind="kv")
    first, second = mapper.map(kv.parse("T=21 n=3")), mapper.map(kv.parse("T=21.5 n=3.25"))
    assert first == {"T": good(21.0), "n": good(3.0)}
    assert second == {"T": good(21.5), "n": good(3.25)}


def test_a_value_that_does_not_fit_its_type_is_bad_not_a_new_type() -> None:
    mapper = FieldMapper({}, keep_unlisted=True)
    kv = parser(kind="kv")
    assert mapper.map(kv.parse("T=21.5 ok=true s=run"))["ok"] == good(True, ValueType.BOOL)
    later = mapper.map(kv.parse("T=ERR ok=maybe s=42"))
    assert later == {
        "T": Value(None, None, Quality.BAD, ValueType.FLOAT),
        "ok": Value(None, None, Quality.BAD, ValueType.BOOL),
        "s": good("42", ValueType.STRING),  # a string field takes any text
    }
    assert mapper.bad_values == 2


def test_json_numbers_are_floats_unless_configured_int() -> None:
    mapper = FieldMapper({"count": FieldConfig(type="int")}, keep_unlisted=True)
    json = parser(kind="json")
    assert mapper.map(json.parse('{"t": 21, "count": 3}')) == {"t": good(21.0), "count": good(3, ValueType.INT)}
    assert mapper.map(json.parse('{"t": 21.5, "count": 3.5}')) == {
        "t": good(21.5),
        "count": Value(None, None, Quality.BAD, ValueType.INT),
    }
    assert mapper.map(json.parse('{"t": null}')) == {"t": Value(None, None, Quality.BAD, ValueType.FLOAT)}
    assert mapper.map(json.parse('{"new": null}')) == {}  # no type known yet: nothing to say


def test_configured_types_convert_text() -> None:
    fields = {
        "n": FieldConfig(type="int"),
        "on": FieldConfig(type="bool"),
        "id": FieldConfig(type="str"),
        "x": FieldConfig(type="float"),
    }
    values = FieldMapper(fields, keep_unlisted=False).map(parser(kind="kv").parse("n=7 on=1 id=0042 x=nan"))
    assert values["n"] == good(7, ValueType.INT)
    assert values["on"] == good(True, ValueType.BOOL)
    assert values["id"] == good("0042", ValueType.STRING)
    assert math.isnan(values["x"].value)  # type: ignore[arg-type]


def test_allow_list_rename_unit_scale_and_offset() -> None:
    fields = {
        "T": FieldConfig(name="temperature", unit="degC", scale=0.1, offset=-40),
        "H": FieldConfig(name="humidity", unit="%"),
    }
    kv = parser(kind="kv")
    assert FieldMapper(fields, keep_unlisted=False).map(kv.parse("T=615 H=40 X=1")) == {
        "temperature": good(21.5, unit="degC"),
        "humidity": good(40.0, unit="%"),
    }
    assert "X" in FieldMapper(fields, keep_unlisted=True).map(kv.parse("T=615 H=40 X=1"))


def test_scaling_rounds_away_float_noise() -> None:
    values = FieldMapper({"p": FieldConfig(scale=0.01)}, keep_unlisted=False).map(parser(kind="kv").parse("p=165"))
    assert values["p"].value == 1.65


def test_field_names_are_bounded() -> None:
    mapper = FieldMapper({}, keep_unlisted=True, max_fields=3)
    values = mapper.map(parser(kind="kv").parse("a=1 b=2 c=3 d=4 e=5"))
    assert list(values) == ["a", "b", "c"]
    assert mapper.untracked == 2
