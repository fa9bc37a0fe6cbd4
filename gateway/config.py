"""The gateway's config schema: one TOML file, validated in full before anything starts.

See ``docs/config-gateway.md`` for every key; ``configs/gateway.toml`` is a commented sample.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Field

from fieldlink.broker_auth import PasswordFileError, check_topic_filter, read_password_file
from fieldlink.configkit import (
    Duration,
    MetricsSection,
    Problem,
    Schema,
    TopicLevel,
    check_plugin_kinds,
    load_config,
)
from gateway.buffer.config import BufferConfig
from gateway.sources.registry import source_kinds
from gateway.uplink.config import UplinkConfig

__all__ = ["GatewayConfig", "load_gateway_config"]


def _source_union() -> Any:
    models = tuple(kind.config_model for kind in source_kinds().values())
    if len(models) == 1:
        return models[0]
    return Annotated[Union[models], Field(discriminator="kind")]  # noqa: UP007 (built at run time)


SourceConfig = _source_union()


class GatewaySection(Schema):
    site: TopicLevel
    id: TopicLevel
    state_dir: Path = Path("/var/lib/fieldlink")
    health_interval: Duration = 10.0
    drain_timeout: Duration = Field(default=5.0, description="how long shutdown waits for the buffer to drain")


TopicFilter = Annotated[str, AfterValidator(check_topic_filter)]


class TopicRulesSection(Schema):
    """``[local_broker.acl.<user>]``: the topic filters one user may publish to and subscribe within."""

    publish: list[TopicFilter] = Field(default_factory=list)
    subscribe: list[TopicFilter] = Field(default_factory=list)


class LocalBrokerSection(Schema):
    enabled: bool = True
    bind: str = "127.0.0.1:1883"
    users_file: Path | None = Field(default=None, description="amqtt password file; set: clients must log in")
    allow_anonymous_on_lan: bool = False
    acl: dict[str, TopicRulesSection] | None = None


class CommandsSection(Schema):
    """``[commands]``: who may have the gateway write to its devices."""

    # Only the cloud by default: a write moves plant equipment, so each channel is opted
    # into on purpose, and a plant usually has one commanding master, not two.
    allow_from: list[Literal["cloud", "local"]] = Field(default_factory=lambda: ["cloud"])
    local_users: list[str] | None = None  # None: any local client (when "local" is allowed)


class LoggingSection(Schema):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["kv", "json"] = "kv"


class GatewayConfig(Schema):
    gateway: GatewaySection
    local_broker: LocalBrokerSection = LocalBrokerSection()
    commands: CommandsSection = CommandsSection()
    buffer: BufferConfig = BufferConfig()
    uplink: UplinkConfig = UplinkConfig()
    logging: LoggingSection = LoggingSection()
    metrics: MetricsSection = MetricsSection()
    sources: list[SourceConfig] = Field(default_factory=list)  # type: ignore[valid-type]

    @property
    def buffer_path(self) -> Path:
        return self.gateway.state_dir / self.buffer.path


def _cross_checks(config: GatewayConfig) -> list[Problem]:
    problems: list[Problem] = []
    source_names: dict[str, int] = {}
    device_names: dict[str, str] = {}
    for i, source in enumerate(config.sources):
        if source.name in source_names:
            problems.append(
                Problem(
                    f"sources[{i}].name",
                    f"{source.name!r} is already used by sources[{source_names[source.name]}]",
                )
            )
        source_names.setdefault(source.name, i)
        for j, device in enumerate(source.devices):
            # A single-device source (serial) names its device with `device`, not `devices[j].name`.
            one_device = isinstance(getattr(source, "device", None), str)
            key = f"sources[{i}].device" if one_device else f"sources[{i}].devices[{j}].name"
            if device.name in device_names:
                problems.append(
                    Problem(key, f"device {device.name!r} is already defined at {device_names[device.name]}")
                )
            device_names.setdefault(device.name, key)
    host, _, port = config.local_broker.bind.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        problems.append(Problem("local_broker.bind", f"must be HOST:PORT, got {config.local_broker.bind!r}"))
    elif config.local_broker.enabled:
        problems += _local_broker_checks(config.local_broker, host)
    return problems + _commands_checks(config)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable from the network


def _local_broker_checks(section: LocalBrokerSection, host: str) -> list[Problem]:
    """The local broker is open to this machine only, unless it asks for logins or says it means it."""
    problems: list[Problem] = []
    if section.users_file is None:
        if not _is_loopback(host) and not section.allow_anonymous_on_lan:
            problems.append(
                Problem(
                    "local_broker.bind",
                    f"{section.bind!r} lets other hosts in, and anyone who can reach it could publish "
                    "(device commands included): set local_broker.users_file to require a login, or "
                    "local_broker.allow_anonymous_on_lan = true to accept anonymous clients from the network",
                )
            )
        if section.acl is not None:
            problems.append(Problem("local_broker.acl", "needs local_broker.users_file (rules are per logged-in user)"))
        return problems
    if section.allow_anonymous_on_lan:
        problems.append(
            Problem("local_broker.allow_anonymous_on_lan", "contradicts local_broker.users_file: every client logs in")
        )
    try:
        users = read_password_file(section.users_file)
    except PasswordFileError as exc:
        return [*problems, Problem("local_broker.users_file", str(exc))]
    for user in section.acl or {}:
        if user not in users:
            problems.append(Problem(f"local_broker.acl.{user}", f"no user {user!r} in {section.users_file}"))
    return problems


def _commands_checks(config: GatewayConfig) -> list[Problem]:
    commands, broker = config.commands, config.local_broker
    if commands.local_users is None:
        return []
    if "local" not in commands.allow_from:
        return [Problem("commands.local_users", 'has no effect: commands.allow_from does not include "local"')]
    if broker.users_file is None or not broker.enabled:
        return [
            Problem(
                "commands.local_users",
                "needs local_broker.users_file: without logins a local client has no user name",
            )
        ]
    try:
        users = read_password_file(broker.users_file)
    except PasswordFileError:
        return []  # reported under local_broker.users_file
    return [
        Problem(f"commands.local_users[{i}]", f"no user {user!r} in {broker.users_file}")
        for i, user in enumerate(commands.local_users)
        if user not in users
    ]


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """Load and validate; raises ConfigError listing every problem with file and dotted key."""
    kinds = source_kinds()
    return load_config(
        path,
        GatewayConfig,
        union_tags=frozenset(kinds),
        prechecks=lambda data: check_plugin_kinds(data, "sources", sorted(kinds), "source"),
        checks=_cross_checks,
    )
