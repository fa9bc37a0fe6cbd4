"""The one place where store kinds are registered (name -> config model, factory)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloud.stores.base import Store

__all__ = ["StoreKind", "build_store", "register_store", "store_kinds"]


@dataclass(frozen=True)
class StoreKind:
    name: str
    config_model: type[Any]
    factory: Callable[[Any, Any], Store]  # (store config, cloud config) -> Store


_KINDS: dict[str, StoreKind] = {}


def register_store(name: str, config_model: type[Any], factory: Callable[[Any, Any], Store]) -> None:
    if name in _KINDS:
        raise ValueError(f"store kind {name!r} registered twice")
    _KINDS[name] = StoreKind(name, config_model, factory)


def store_kinds() -> dict[str, StoreKind]:
    import cloud.stores.plugins  # noqa: F401, PLC0415 (registers the built-in kinds)

    return dict(_KINDS)


def build_store(config: Any, cloud_config: Any) -> Store:
    return store_kinds()[config.kind].factory(config, cloud_config)
