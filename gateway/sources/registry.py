"""The one place where source kinds are registered.

A source plugin declares its config model (a Schema with ``kind: Literal["..."]``)
and a factory; the gateway config builds its ``sources`` union from this registry,
so adding a kind never edits a switch statement elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.sources.base import Source

__all__ = ["SourceKind", "register_source", "source_kinds"]


@dataclass(frozen=True)
class SourceKind:
    name: str
    config_model: type[Any]
    factory: Callable[[Any], Source]


_KINDS: dict[str, SourceKind] = {}


def register_source(name: str, config_model: type[Any], factory: Callable[[Any], Source]) -> None:
    if name in _KINDS:
        raise ValueError(f"source kind {name!r} registered twice")
    _KINDS[name] = SourceKind(name, config_model, factory)


def source_kinds() -> dict[str, SourceKind]:
    # Importing the package registers the built-in plugins.
    import gateway.sources.plugins  # noqa: F401, PLC0415

    return dict(_KINDS)


def build_source(config: Any) -> Source:
    return source_kinds()[config.kind].factory(config)
