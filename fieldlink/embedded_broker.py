"""amqtt embedded in our process: the gateway's local broker, and the cloud's single-node broker.

By default only the anonymous-auth plugin and our tap are loaded: amqtt's default
plugins (packet logger, $SYS) cost about a quarter of its throughput. No delivery
guarantee rests on amqtt: with anonymous access it deletes sessions on disconnect and
keeps them only in memory, so whatever must survive goes through our own SQLite buffer.

With a password file (``users_file``) clients must log in (amqtt's FileAuthPlugin
format, see :mod:`fieldlink.broker_auth`), and with ``acl`` each user may publish and
subscribe only within its topic filters (:mod:`fieldlink.broker_access`). Our in-process
publishes (:meth:`publish`) bypass both: they are the gateway's own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BasePlugin
from amqtt.session import ApplicationMessage

from fieldlink.broker_access import LoginBroker, PasswordFileAuth, TopicAcl
from fieldlink.broker_auth import TopicRules

__all__ = ["EmbeddedBroker", "PublishTap", "TopicRules"]

log = logging.getLogger(__name__)

PublishTap = Callable[[str, str, bytes], None]
"""Called with (client_id, topic, payload) for every publish a client made."""


class BroadcastTap(BasePlugin[Any]):
    """Sees every publication a client made, after the broker accepted it.

    It runs after the publisher got its PUBACK and gives no backpressure: a tap, not
    a durability point. The gateway's own readings go to the buffer directly.
    amqtt calls it only for publishes the topic rules allowed.
    """

    tap: PublishTap | None = None

    async def on_broker_message_broadcast(self, *, client_id: str, message: ApplicationMessage) -> None:
        if self.tap is not None and message.topic:
            self.tap(client_id, message.topic, bytes(message.data or b""))


class EmbeddedBroker:
    """An in-process MQTT 3.1.1 broker listening on ``host:port`` (TCP), optionally WebSocket.

    Anonymous unless ``users_file`` is given; ``acl`` (user -> rules) needs ``users_file``.
    """

    def __init__(
        self,
        bind: str,
        *,
        ws_bind: str | None = None,
        tap: PublishTap | None = None,
        users_file: Path | None = None,
        acl: Mapping[str, TopicRules] | None = None,
    ) -> None:
        listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": bind}}
        if ws_bind:
            listeners["ws"] = {"type": "ws", "bind": ws_bind}
        if acl is not None and users_file is None:
            raise ValueError("topic rules need a users_file: anonymous clients have no user name")
        plugins: dict[str, Any] = {}
        if users_file is None:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        else:
            plugins[f"{PasswordFileAuth.__module__}.PasswordFileAuth"] = {"password_file": str(users_file)}
        if acl is not None:
            plugins[f"{TopicAcl.__module__}.TopicAcl"] = {
                "publish": {user: list(rules.publish) for user, rules in acl.items()},
                "subscribe": {user: list(rules.subscribe) for user, rules in acl.items()},
            }
        plugins[f"{__name__}.BroadcastTap"] = {}
        self._config = {"listeners": listeners, "plugins": plugins}
        self.bind = bind
        self.authenticated = users_file is not None
        self._tap = tap
        self._broker: Broker | None = None
        self._auth: PasswordFileAuth | None = None
        self._acl: TopicAcl | None = None

    async def start(self) -> None:
        # amqtt fixed where logins matter; the anonymous brokers (the cloud's) stay as they were.
        self._broker = LoginBroker(self._config) if self.authenticated else Broker(self._config)
        await self._broker.start()
        manager = self._broker.plugins_manager
        plugin = manager.get_plugin(BroadcastTap.__name__)
        if isinstance(plugin, BroadcastTap):
            plugin.tap = self._tap
        auth, acl = manager.get_plugin(PasswordFileAuth.__name__), manager.get_plugin(TopicAcl.__name__)
        self._auth = auth if isinstance(auth, PasswordFileAuth) else None
        self._acl = acl if isinstance(acl, TopicAcl) else None
        log.info(
            "embedded broker listening",
            extra={"bind": self.bind, "auth": self.authenticated, "acl": self._acl is not None},
        )

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None

    def username(self, client_id: str) -> str | None:
        """The user name a connected client logged in with (None: anonymous, or gone).

        Call it from the tap: amqtt hands its plugins only the client id, and the session
        it names is the one that made the publish as long as that client stays connected.
        """
        if self._broker is None:
            return None
        entry = self._broker.sessions.get(client_id)
        return entry[0].username if entry is not None else None

    def counters(self) -> dict[str, object]:
        """For the health report: whether logins and topic rules are on, and what they refused."""
        return {
            "bind": self.bind,
            "auth": self.authenticated,
            "acl": self._acl is not None,
            "refused_logins": self._auth.refusals.total if self._auth is not None else 0,
            "refused_topics": self._acl.refusals.total if self._acl is not None else 0,
        }

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 0) -> None:
        """Deliver a message to local subscribers from inside the process (no TCP hop)."""
        if self._broker is None:
            return
        await self._broker.internal_message_broadcast(topic, payload, qos)
        if retain:
            await self._broker.retain_message(None, topic, payload, qos)
