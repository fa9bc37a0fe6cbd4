"""The gateway's config schema: one TOML file, validated in full before anything starts.

See ``docs/config-gateway.md`` for every key; ``configs/gateway.toml`` is a commented sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field

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


class LocalBrokerSection(Schema):
    enabled: bool = True
    bind: str = "127.0.0.1:1883"


class LoggingSection(Schema):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["kv", "json"] = "kv"


class GatewayConfig(Schema):
    gateway: GatewaySection
    local_broker: LocalBrokerSection = LocalBrokerSection()
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
    return problems


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
