"""The one place where notifier kinds are registered (name -> config model, factory)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloud.notify.base import Notifier

__all__ = ["NotifierKind", "build_notifier", "notifier_kinds", "register_notifier"]


@dataclass(frozen=True)
class NotifierKind:
    name: str
    config_model: type[Any]
    factory: Callable[[Any], Notifier]


_KINDS: dict[str, NotifierKind] = {}


def register_notifier(name: str, config_model: type[Any], factory: Callable[[Any], Notifier]) -> None:
    if name in _KINDS:
        raise ValueError(f"notifier kind {name!r} registered twice")
    _KINDS[name] = NotifierKind(name, config_model, factory)


def notifier_kinds() -> dict[str, NotifierKind]:
    import cloud.notify.plugins  # noqa: F401, PLC0415 (registers the built-in kinds)

    return dict(_KINDS)


def build_notifier(config: Any) -> Notifier:
    return notifier_kinds()[config.kind].factory(config)
