"""The cloud's config schema: one TOML file, validated in full before anything starts.

See ``docs/config-cloud.md`` for every key; ``configs/cloud.toml`` is a commented sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator

from cloud.alerting.config import RULE_KINDS, AlertingSection, RouteConfig, RuleConfig
from cloud.notify.registry import notifier_kinds
from cloud.stores.registry import store_kinds
from fieldlink.configkit import (
    Bind,
    ByteSize,
    Duration,
    MetricsSection,
    Problem,
    Schema,
    TopicLevel,
    TopicPrefix,
    check_plugin_kinds,
    load_config,
)
from fieldlink.mqtt import MqttSettings
from fieldlink.wire import ROOT

__all__ = ["CloudConfig", "load_cloud_config"]


def _union(models: tuple[type[Any], ...]) -> Any:
    if len(models) == 1:
        return models[0]
    return Annotated[Union[models], Field(discriminator="kind")]  # noqa: UP007 (built at run time)


StoreConfig = _union(tuple(k.config_model for k in store_kinds().values()))
NotifierConfig = _union(tuple(k.config_model for k in notifier_kinds().values()))


class CloudSection(Schema):
    name: TopicLevel = "cloud-1"  # this worker; part of its MQTT client id and health topic
    state_dir: Path = Path("/var/lib/fieldlink-cloud")
    health_interval: Duration = 10.0


class BrokerSection(MqttSettings):
    """The cloud broker. ``embedded = true`` runs an amqtt broker in this process instead."""

    embedded: bool = False
    bind: str = "127.0.0.1:1883"  # where the embedded broker listens
    ws_bind: str | None = None  # embedded broker: also MQTT over WebSocket here, for browser dashboards
    # The gateways' uplink.topic_prefix: subscribed under it, and removed before parsing.
    topic_prefix: TopicPrefix = ""
    # Scale-out: workers with the same shared_group split the messages between them
    # ($share/<group>/...); sites limits this worker to those sites (a partition).
    shared_group: TopicLevel | None = None
    sites: list[TopicLevel] = Field(default_factory=list)

    def filters(self, statuses: bool = False, health: bool = False) -> list[str]:
        """The subscriptions of this worker: telemetry and batches (and statuses for dashboards
        and offline rules, health for backlog rules), per site or all, shared or not."""
        share = f"$share/{self.shared_group}/" if self.shared_group else ""
        sites = self.sites or ["+"]
        tails = (
            "dev/+/telemetry",
            "batch",
            *(("status", "dev/+/status") if statuses else ()),
            *(("health",) if health else ()),
        )
        return [f"{share}{self.topic_prefix}{ROOT}/{site}/+/{tail}" for site in sites for tail in tails]

    def effective(self) -> MqttSettings:
        """Connection settings: an embedded broker is reached on its bind address."""
        fields = {k: getattr(self, k) for k in MqttSettings.model_fields}  # (without topic_prefix)
        if self.embedded:
            fields["url"] = f"mqtt://{self.bind}"
        return MqttSettings(**fields)


class IngestSection(Schema):
    # Bad messages (undecodable, wrong schema, unknown version, oversized, off-topic) are
    # republished here with their reason; default fl-cloud/<cloud.name>/dead-letter.
    dead_letter_topic: str | None = None
    max_message_bytes: ByteSize = 1_000_000
    # Store down: after spool_after of retries, records go to <state_dir>/spool.db and
    # their messages are acknowledged; a drainer writes them once the store is back.
    spool: bool = True
    spool_after: Duration = 2.0

    @field_validator("dead_letter_topic")
    @classmethod
    def _plain_topic(cls, topic: str | None) -> str | None:
        if topic is not None and (not topic or any(c in topic for c in "+#\0") or topic.startswith("$")):
            raise ValueError(f"must be a topic name without wildcards, NUL or a leading $, got {topic!r}")
        return topic


class DashboardSection(Schema):
    enabled: bool = True
    prefix: TopicLevel = "dash"


class WebSection(Schema):
    """The live dashboard page (cloud/web.py, docs/web-dashboard.md): off unless enabled."""

    enabled: bool = False
    bind: Bind = "127.0.0.1:8080"  # keep it on loopback, or behind a reverse proxy
    # The ws:// URL the browser opens to reach the broker; default ws://<broker.ws_bind> when embedded.
    mqtt_url: str | None = None

    @field_validator("mqtt_url")
    @classmethod
    def _websocket_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("ws://", "wss://")):
            raise ValueError(f"must start with ws:// or wss:// (the broker's WebSocket listener), got {url!r}")
        return url

    def browser_mqtt_url(self, broker: BrokerSection) -> str | None:
        """Where the page connects: ``mqtt_url``, else the embedded broker's WebSocket listener."""
        if self.mqtt_url:
            return self.mqtt_url
        if broker.embedded and broker.ws_bind:
            return f"ws://{broker.ws_bind}"
        return None


class LoggingSection(Schema):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["kv", "json"] = "kv"


class CloudConfig(Schema):
    cloud: CloudSection = CloudSection()
    broker: BrokerSection = BrokerSection()
    store: StoreConfig = Field(default_factory=lambda: store_kinds()["sqlite"].config_model(kind="sqlite"))  # type: ignore[valid-type]
    dashboard: DashboardSection = DashboardSection()
    web: WebSection = WebSection()
    ingest: IngestSection = IngestSection()
    logging: LoggingSection = LoggingSection()
    metrics: MetricsSection = MetricsSection()
    notifiers: list[NotifierConfig] = Field(default_factory=list)  # type: ignore[valid-type]
    rules: list[RuleConfig] = Field(default_factory=list)  # type: ignore[valid-type]
    alerting: AlertingSection = AlertingSection()


def _cross_checks(config: CloudConfig) -> list[Problem]:
    problems: list[Problem] = []
    if config.broker.embedded and config.broker.tls is not None:
        problems.append(Problem("broker.tls", "the embedded broker speaks plain MQTT only; remove the table"))
    notifier_names: set[str] = set()
    for i, notifier in enumerate(config.notifiers):
        if notifier.name in notifier_names:
            problems.append(Problem(f"notifiers[{i}].name", f"{notifier.name!r} is used twice"))
        notifier_names.add(notifier.name)
    known = ", ".join(sorted(notifier_names)) or "none configured"

    def receiver(key: str, name: str) -> None:
        if name not in notifier_names:
            problems.append(Problem(key, f"no notifier named {name!r} (known: {known})"))

    rule_names: set[str] = set()
    for i, rule in enumerate(config.rules):
        if rule.name in rule_names:
            problems.append(Problem(f"rules[{i}].name", f"{rule.name!r} is used twice"))
        rule_names.add(rule.name)
        for j, target in enumerate(rule.notify):
            receiver(f"rules[{i}].notify[{j}]", target)

    def walk(route: RouteConfig, key: str) -> None:
        for j, name in enumerate(route.receivers or []):
            receiver(f"{key}.receivers[{j}]", name)
        for j, name in enumerate(route.escalate_to or []):
            receiver(f"{key}.escalate_to[{j}]", name)
        if route.escalate_to and route.escalate_after is None:
            problems.append(Problem(f"{key}.escalate_after", "escalate_to needs escalate_after beside it"))
        for j, child in enumerate(route.routes):
            walk(child, f"{key}.routes[{j}]")

    walk(config.alerting.routing, "alerting.routing")
    for name in config.alerting.rate_limits:
        receiver(f"alerting.rate_limits.{name}", name)
    if config.web.enabled and config.web.browser_mqtt_url(config.broker) is None:
        problems.append(
            Problem(
                "web.mqtt_url",
                "the page needs the broker's WebSocket URL: set it (ws://HOST:PORT), "
                "or run the embedded broker with broker.ws_bind",
            )
        )
    if config.web.enabled and not config.dashboard.enabled:
        problems.append(Problem("web.enabled", "the page shows dashboard topics: set dashboard.enabled = true"))
    if config.broker.embedded:
        host, _, port = config.broker.bind.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            problems.append(Problem("broker.bind", f"must be HOST:PORT, got {config.broker.bind!r}"))
    return problems


def _prechecks(data: dict[str, Any]) -> list[Problem]:
    problems = check_plugin_kinds(data, "notifiers", sorted(notifier_kinds()), "notifier")
    store = data.get("store")
    if isinstance(store, dict):
        known = sorted(store_kinds())
        wrapped = {"store": [store]}
        problems += [
            Problem(p.key.replace("store[0]", "store"), p.message)
            for p in check_plugin_kinds(wrapped, "store", known, "store")
        ]
    return problems


def load_cloud_config(path: str | Path) -> CloudConfig:
    """Load and validate; raises ConfigError listing every problem with file and dotted key."""
    return load_config(
        path,
        CloudConfig,
        union_tags=frozenset(store_kinds()) | frozenset(notifier_kinds()) | frozenset(RULE_KINDS),
        prechecks=_prechecks,
        checks=_cross_checks,
    )
