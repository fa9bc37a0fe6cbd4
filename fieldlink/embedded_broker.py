"""amqtt embedded in our process: the gateway's local broker, and the cloud's single-node broker.

Only the anonymous-auth plugin and our tap are loaded: amqtt's default plugins
(packet logger, $SYS) cost about a quarter of its throughput. No delivery guarantee
rests on amqtt: with anonymous access it deletes sessions on disconnect and keeps
them only in memory, so whatever must survive goes through our own SQLite buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BasePlugin
from amqtt.session import ApplicationMessage

__all__ = ["EmbeddedBroker", "PublishTap"]

log = logging.getLogger(__name__)

PublishTap = Callable[[str, str, bytes], None]
"""Called with (client_id, topic, payload) for every publish a client made."""


class BroadcastTap(BasePlugin[Any]):
    """Sees every publication a client made, after the broker accepted it.

    It runs after the publisher got its PUBACK and gives no backpressure: a tap, not
    a durability point. The gateway's own readings go to the buffer directly.
    """

    tap: PublishTap | None = None

    async def on_broker_message_broadcast(self, *, client_id: str, message: ApplicationMessage) -> None:
        if self.tap is not None and message.topic:
            self.tap(client_id, message.topic, bytes(message.data or b""))


class EmbeddedBroker:
    """An in-process MQTT 3.1.1 broker listening on ``host:port`` (TCP), optionally WebSocket."""

    def __init__(self, bind: str, *, ws_bind: str | None = None, tap: PublishTap | None = None) -> None:
        listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": bind}}
        if ws_bind:
            listeners["ws"] = {"type": "ws", "bind": ws_bind}
        self._config = {
            "listeners": listeners,
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                f"{__name__}.BroadcastTap": {},
            },
        }
        self.bind = bind
        self._tap = tap
        self._broker: Broker | None = None

    async def start(self) -> None:
        self._broker = Broker(self._config)
        await self._broker.start()
        plugin = self._broker.plugins_manager.get_plugin(BroadcastTap.__name__)
        if isinstance(plugin, BroadcastTap):
            plugin.tap = self._tap
        log.info("embedded broker listening", extra={"bind": self.bind})

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 0) -> None:
        """Deliver a message to local subscribers from inside the process (no TCP hop)."""
        if self._broker is None:
            return
        await self._broker.internal_message_broadcast(topic, payload, qos)
        if retain:
            await self._broker.retain_message(None, topic, payload, qos)
