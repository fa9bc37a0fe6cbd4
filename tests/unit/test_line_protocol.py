"""Records to InfluxDB line protocol: the exact line, escaping, and which values are left out."""

from __future__ import annotations

import math

import pytest

from cloud.stores.line_protocol import escape_key, escape_measurement, format_record
from fieldlink.wire import Quality, Record, Value, ValueType

TS = 1_700_000_000_123


def record(
    values: dict[str, Value], *, site: str = "plant-1", gateway: str = "gw-1", device: str = "boiler-1"
) -> Record:
    return Record(site, gateway, device, 1, TS, values)


def test_exact_line_for_every_field_type() -> None:
    line = format_record(
        record(
            {
                "temp": Value.of(21.5, "degC"),
                "count": Value.of(42),
                "on": Value.of(True),
                "off": Value.of(False),
                "state": Value.of("running"),
            }
        ),
        "fieldlink",
    )
    assert line == (
        "fieldlink,site=plant-1,gateway=gw-1,device=boiler-1 "
        'temp=21.5,count=42i,on=true,off=false,state="running" 1700000000123'
    )


def test_integer_extremes_of_int64() -> None:
    line = format_record(record({"lo": Value.of(-(2**63)), "hi": Value.of(2**63 - 1), "neg": Value.of(-7)}), "m")
    assert (
        line
        == f"m,site=plant-1,gateway=gw-1,device=boiler-1 lo=-9223372036854775808i,hi=9223372036854775807i,neg=-7i {TS}"
    )


def test_integer_beyond_int64_becomes_an_unsigned_field() -> None:
    # Regression: 2**64-1 (allowed by the wire) used to become an out-of-range 'i' field
    # that InfluxDB refuses.
    line = format_record(
        record({"total": Value.of(2**64 - 1), "edge": Value.of(2**63), "max": Value.of(2**63 - 1)}), "m"
    )
    assert line == (
        "m,site=plant-1,gateway=gw-1,device=boiler-1 "
        f"total=18446744073709551615u,edge=9223372036854775808u,max=9223372036854775807i {TS}"
    )


def test_integral_float_stays_a_float() -> None:
    line = format_record(record({"a": Value.of(3.0), "b": Value(3, None, Quality.GOOD, ValueType.FLOAT)}), "m")
    assert line == f"m,site=plant-1,gateway=gw-1,device=boiler-1 a=3.0,b=3.0 {TS}"
    assert "3i" not in line


def test_floats_keep_full_precision_and_exponents() -> None:
    line = format_record(record({"tiny": Value.of(1e-7), "big": Value.of(1e20), "pi": Value.of(math.pi)}), "m")
    assert line == f"m,site=plant-1,gateway=gw-1,device=boiler-1 tiny=1e-07,big=1e+20,pi={math.pi!r} {TS}"
    assert float(line.split("pi=")[1].split()[0]) == math.pi


def test_escaping_of_tags_and_field_keys() -> None:
    line = format_record(
        record(
            {"flow rate,m3=h": Value.of(1.5)},
            site="plant 1",
            gateway="gw,2",
            device="pump=3",
        ),
        "fieldlink",
    )
    assert line == rf"fieldlink,site=plant\ 1,gateway=gw\,2,device=pump\=3 flow\ rate\,m3\=h=1.5 {TS}"


def test_escaping_of_string_values() -> None:
    line = format_record(record({"msg": Value.of('say "hi" C:\\temp\\')}), "m")
    assert line == rf'm,site=plant-1,gateway=gw-1,device=boiler-1 msg="say \"hi\" C:\\temp\\" {TS}'
    # Commas, spaces and equals signs inside a string value need no escape.
    line = format_record(record({"msg": Value.of("a, b = c")}), "m")
    assert line == f'm,site=plant-1,gateway=gw-1,device=boiler-1 msg="a, b = c" {TS}'


def test_escaping_of_the_measurement() -> None:
    line = format_record(record({"v": Value.of(1)}), "my measurement,v2")
    assert line is not None
    assert line.startswith(r"my\ measurement\,v2,site=plant-1,")
    assert escape_measurement("a=b") == "a=b"  # equals signs are legal in a measurement
    assert escape_key("a=b") == r"a\=b"


def test_non_ascii_names_are_kept_as_is() -> None:
    line = format_record(
        record({"Temperatur_°C": Value.of(21.5), "流量": Value.of(2)}, site="Köln", device="Kessel-ü"), "messwerte"
    )
    assert line == f"messwerte,site=Köln,gateway=gw-1,device=Kessel-ü Temperatur_°C=21.5,流量=2i {TS}"


def test_values_not_good_or_null_are_left_out() -> None:
    line = format_record(
        record(
            {
                "bad": Value(5.0, None, Quality.BAD, ValueType.FLOAT),
                "uncertain": Value(6.0, None, Quality.UNCERTAIN, ValueType.FLOAT),
                "lost": Value(None, None, Quality.BAD, ValueType.INT),
                "good": Value.of(7.0),
            }
        ),
        "m",
    )
    assert line == f"m,site=plant-1,gateway=gw-1,device=boiler-1 good=7.0 {TS}"


def test_non_finite_floats_are_left_out() -> None:
    line = format_record(
        record(
            {"nan": Value.of(math.nan), "inf": Value.of(math.inf), "ninf": Value.of(-math.inf), "ok": Value.of(0.5)}
        ),
        "m",
    )
    assert line == f"m,site=plant-1,gateway=gw-1,device=boiler-1 ok=0.5 {TS}"


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"bad": Value(1.0, None, Quality.BAD, ValueType.FLOAT)},
        {"lost": Value(None, "degC", Quality.UNCERTAIN, ValueType.FLOAT)},
        {"nan": Value.of(math.nan), "inf": Value.of(math.inf)},
    ],
    ids=["no-values", "only-bad", "only-null", "only-non-finite"],
)
def test_a_record_without_a_good_value_gives_none(values: dict[str, Value]) -> None:
    assert format_record(record(values), "m") is None


# --- mapping: tags, units, precision -----------------------------------------------------------

from cloud.stores.line_protocol import LineMapping, format_lines  # noqa: E402


def test_the_default_mapping_is_the_one_line_format() -> None:
    r = record({"temp": Value.of(21.5, "degC")})
    assert format_lines(r, LineMapping()) == [format_record(r, "fieldlink")]


def test_units_as_tags_make_one_point_per_value() -> None:
    r = record({"temp": Value.of(21.5, "degC"), "count": Value.of(3), "bad": Value(None, "x", Quality.BAD)})
    assert format_lines(r, LineMapping("m", ("device",), "tag")) == [
        f"m,device=boiler-1,unit=degC temp=21.5 {TS}",
        f"m,device=boiler-1 count=3i {TS}",
    ]


def test_units_as_fields_travel_next_to_their_value() -> None:
    r = record({"temp": Value.of(21.5, "deg C"), "count": Value.of(3)})
    assert format_lines(r, LineMapping("m", ("site", "device"), "field")) == [
        f'm,site=plant-1,device=boiler-1 temp=21.5,temp_unit="deg C",count=3i {TS}'
    ]


@pytest.mark.parametrize(
    ("precision", "ts"), [("s", 1_700_000_000), ("ms", TS), ("us", TS * 1000), ("ns", TS * 1_000_000)]
)
def test_precision_scales_the_millisecond_timestamp(precision: str, ts: int) -> None:
    (line,) = format_lines(record({"a": Value.of(1)}), LineMapping("m", ("device",), "none", precision))  # type: ignore[arg-type]
    assert line.endswith(f" {ts}")


def test_a_store_mapping_must_keep_the_device_tag() -> None:
    from pydantic import ValidationError  # noqa: PLC0415

    from cloud.stores.influxdb import InfluxDBConfig  # noqa: PLC0415

    with pytest.raises(ValidationError, match="must include 'device'"):
        InfluxDBConfig.model_validate({"kind": "influxdb", "url": "http://x", "tags": ["site"]})
    config = InfluxDBConfig.model_validate({"kind": "influxdb", "url": "http://x", "tags": ["device"], "units": "tag"})
    assert config.mapping == LineMapping("fieldlink", ("device",), "tag", "ms")


def test_retry_after_reads_seconds_and_http_dates() -> None:
    from datetime import UTC, datetime, timedelta  # noqa: PLC0415
    from email.utils import format_datetime  # noqa: PLC0415

    from cloud.stores.influxdb import _retry_after  # noqa: PLC0415

    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None
    assert _retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (_retry_after(later) or 0) <= 30
    assert _retry_after(format_datetime(datetime(2000, 1, 1, tzinfo=UTC), usegmt=True)) == 0.0
