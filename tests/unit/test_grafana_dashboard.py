"""deploy/grafana: the dashboard's queries against what the cloud really writes to InfluxDB.

There is no Grafana nor InfluxDB in the test rig, so this checks the files: they
parse, every panel queries the provisioned data source, every variable is used, and
the measurement, tags and fields the queries name are the ones the cloud's
line-protocol mapping (`cloud/stores/line_protocol.py`) produces by default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML, a dependency of amqtt

from cloud.stores.influxdb import InfluxDBConfig
from cloud.stores.line_protocol import LineMapping, format_lines
from fieldlink.wire import Quality, Record, Value, ValueType

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "fieldlink.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "fieldlink.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "fieldlink.yaml"
DOC = REPO / "docs" / "grafana.md"

# What Grafana itself fills into InfluxQL queries and aliases.
GRAFANA_MACROS = {"timeFilter", "__interval", "col"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert isinstance(source, dict)
    return source


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data (rows only group them), nested rows included."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found += [p for p in panel.get("panels", []) if p["type"] != "row"]
        else:
            found.append(panel)
    return found


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["query"] for p in query_panels(dashboard) for t in p["targets"]]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def stored_point(mapping: LineMapping) -> tuple[str, set[str], set[str]]:
    """Measurement, tag keys and field keys of the line the cloud writes for one record."""
    record = Record(
        site="plant-a",
        gateway="gw-01",
        device="boiler-1",
        seq=1,
        ts=1732650000123,
        values={
            "temperature": Value(71.25, "degC"),
            "pump_starts": Value(17, None, Quality.GOOD, ValueType.INT),
            "alarm": Value(True, None, Quality.GOOD, ValueType.BOOL),
        },
    )
    (line,) = format_lines(record, mapping)
    head, fields, _ts = line.split(" ")  # no spaces to escape in these names
    measurement, *tags = head.split(",")
    return measurement, {t.split("=")[0] for t in tags}, {f.split("=")[0] for f in fields.split(",")}


def test_the_dashboard_parses_and_every_panel_has_a_query(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "fieldlink-telemetry"
    panels = query_panels(dashboard)
    assert len(panels) >= 3
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        for target in panel["targets"]:
            assert target.get("rawQuery") is True, f"panel {panel['title']!r}: not a raw InfluxQL query"
            assert target["query"].strip(), f"panel {panel['title']!r}: empty query"
            assert target["query"].lstrip().upper().startswith(("SELECT", "SHOW")), target["query"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_and_variables_use_the_provisioned_data_source(
    dashboard: dict[str, Any], datasource: dict[str, Any]
) -> None:
    expected = {"type": datasource["type"], "uid": datasource["uid"]}
    assert datasource["type"] == "influxdb"
    assert datasource["jsonData"]["version"] == "InfluxQL"
    for panel in query_panels(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
    for variable in variables(dashboard).values():
        if variable["type"] == "query":
            assert variable["datasource"] == expected, variable["name"]


def test_the_data_source_takes_its_address_and_secrets_from_the_environment(datasource: dict[str, Any]) -> None:
    assert datasource["url"] == "${FIELDLINK_INFLUX_URL}"
    assert datasource["database"] == datasource["jsonData"]["dbName"] == "${FIELDLINK_INFLUX_BUCKET}"
    assert datasource["jsonData"]["httpHeaderName1"] == "Authorization"
    assert datasource["secureJsonData"] == {"httpHeaderValue1": "Token ${FIELDLINK_INFLUX_TOKEN}"}


def test_the_dashboard_provider_loads_files(dashboard: dict[str, Any]) -> None:
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).is_absolute()
    assert DASHBOARD.suffix == ".json"


def test_every_variable_is_used_and_every_reference_is_defined(dashboard: dict[str, Any]) -> None:
    defined = variables(dashboard)
    texts = [*queries(dashboard)]
    texts += [v["query"] for v in defined.values() if v["type"] == "query"]
    texts += [p["title"] for p in query_panels(dashboard)]
    texts += [t.get("alias", "") for p in query_panels(dashboard) for t in p["targets"]]
    referenced = {name for text in texts for name in re.findall(r"\$\{?(\w+)", text)}
    referenced -= GRAFANA_MACROS
    referenced = {name for name in referenced if not name.startswith("tag_")}  # $tag_<key> aliases
    assert referenced == set(defined), "variables referenced but not defined, or defined but never used"
    repeated = {p["repeat"] for p in query_panels(dashboard) if "repeat" in p}
    assert repeated <= set(defined)
    # Filters narrow each other: gateways of the chosen sites, devices of the chosen gateways.
    assert "$site" in defined["gateway"]["query"]
    assert {"$site", "$gateway"} <= set(re.findall(r"\$\w+", defined["device"]["query"]))


def test_the_queries_name_what_the_cloud_writes(dashboard: dict[str, Any]) -> None:
    mapping = LineMapping()  # what [store] kind = "influxdb" writes unless configured otherwise
    assert mapping.measurement == InfluxDBConfig(kind="influxdb", url="http://x").measurement
    measurement, tags, fields = stored_point(mapping)
    assert tags == set(mapping.tags)
    assert fields == {"temperature", "pump_starts", "alarm"}  # one field per metric: $metric lists them

    defined = variables(dashboard)
    assert defined["measurement"]["type"] == "constant"
    assert defined["measurement"]["query"] == measurement
    assert defined["metric"]["query"] == 'SHOW FIELD KEYS FROM "$measurement"'
    for name in ("site", "gateway", "device"):
        assert f'WITH KEY = "{name}"' in defined[name]["query"]

    every_query = queries(dashboard) + [v["query"] for v in defined.values() if v["type"] == "query"]
    for query in every_query:
        assert 'FROM "$measurement"' in query, query
        # Every other double-quoted identifier is a tag the cloud writes.
        identifiers = set(re.findall(r'"([^"]+)"', query)) - {"$measurement", "$metric"}
        assert identifiers <= tags, f"{query}: not a tag of the stored points: {identifiers - tags}"
    for query in queries(dashboard):
        # Each panel filters on every level, so the variables narrow every panel.
        for tag in mapping.tags:
            assert f'"{tag}" =~ /^${tag}$/' in query, f"{query}: no filter on {tag}"
        assert "$timeFilter" in query, query


def test_the_doc_explains_every_panel_and_its_query(dashboard: dict[str, Any]) -> None:
    doc = DOC.read_text()
    for panel in query_panels(dashboard):
        title = panel["title"]
        assert title in doc, f"docs/grafana.md does not describe the panel {title!r}"
        for target in panel["targets"]:
            assert target["query"] in doc, f"docs/grafana.md does not show the query of {title!r}"
    for variable in variables(dashboard).values():
        if variable["type"] == "query":
            assert variable["query"] in doc, f"docs/grafana.md does not show the query of ${variable['name']}"
