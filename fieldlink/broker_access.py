"""amqtt plugins, and fixes of its broker, that enforce logins and topic rules on an embedded broker.

:class:`fieldlink.embedded_broker.EmbeddedBroker` loads them when it has a password
file; the rules themselves (file format, filter matching) are in
:mod:`fieldlink.broker_auth`, which config checks import without amqtt.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.authentication import FileAuthPlugin
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from fieldlink.broker_auth import covers

__all__ = ["LoginBroker", "PasswordFileAuth", "TopicAcl"]

log = logging.getLogger("fieldlink.embedded_broker")  # one logger for everything the local broker says

REFUSAL_LOG_INTERVAL = 60.0  # seconds between warnings of one kind; every refusal is counted


class _Refusals:
    """Counts refusals and logs them as warnings, at most one per kind per interval (no log floods)."""

    def __init__(self) -> None:
        self.total = 0
        self._last: dict[str, float] = {}

    def add(self, kind: str, message: str, **details: object) -> None:
        self.total += 1
        now = time.monotonic()
        last = self._last.get(kind)
        if last is None or now - last >= REFUSAL_LOG_INTERVAL:
            if len(self._last) > 1000:  # bounded: a scan of user names must not grow it forever
                self._last.clear()
            self._last[kind] = now
            log.warning(message, extra={**details, "refused_so_far": self.total})


class PasswordFileAuth(FileAuthPlugin):
    """amqtt's FileAuthPlugin, with the hash checked off the event loop and refusals logged.

    An Argon2 check takes tens of milliseconds (more on a Raspberry Pi): done on the
    event loop, every connect would stall polling and the uplink for that long.
    """

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.refusals = _Refusals()
        self._checks = asyncio.Semaphore(2)  # each Argon2 check holds its memory cost (19 MiB)

    async def authenticate(self, *, session: Session) -> bool | None:
        user = session.username if session else None
        stored = self._users.get(user) if user else None  # amqtt 0.12's table (amqtt is pinned to 0.12.*)
        if stored is None:
            reason = "no user name" if not user else "unknown user"
        else:
            async with self._checks:
                accepted = await asyncio.to_thread(self._verify, session.password or "", stored)
            if accepted:
                return True
            reason = "wrong password"
        self.refusals.add(
            f"login:{user}",
            "local broker refused a login",
            user=user or "-",
            client_id=session.client_id if session else "-",
            peer=session.remote_address if session else "-",
            reason=reason,
        )
        return False

    def _verify(self, password: str, stored: str) -> bool:
        try:
            return bool(self.pwd_hasher.verify(password, stored))
        except Exception:  # an unusable hash refuses the login; the config check rejects them up front
            return False


class TopicAcl(BaseTopicPlugin):
    """Per-user topic filters for publish and subscribe; anything not allowed is refused.

    Not amqtt's TopicAccessControlListPlugin: in 0.12 its config has no key for
    subscribe rules other than the deprecated ``acl`` (a warning at every start), and it
    compares filters level by level, so a rule ``fl/+`` lets a client subscribe to
    ``fl/#``. Here a subscription must lie inside a rule (``broker_auth.covers``).
    A refused subscription gets return code 0x80 in its SUBACK; a refused publish is
    dropped without a word (MQTT 3.1.1 cannot say no to a PUBLISH; QoS 1 is still acked).
    """

    @dataclass
    class Config:
        publish: dict[str, list[str]] = field(default_factory=dict)
        subscribe: dict[str, list[str]] = field(default_factory=dict)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.refusals = _Refusals()

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if action is Action.RECEIVE or session is None:
            # Deliveries follow subscriptions, which were checked; the broker's own publishes are ours.
            return True
        rules = self.config.publish if action is Action.PUBLISH else self.config.subscribe
        user = session.username or ""
        if topic and any(covers(allowed, topic) for allowed in rules.get(user, ())):
            return True
        self.refusals.add(
            f"{action}:{user}:{topic}",
            f"local broker refused a {action}",
            user=user or "-",
            client_id=session.client_id,
            topic=topic or "-",
        )
        return False


# A CONNECT's session changes that amqtt makes before it checks the password (below).
_CONNECT_FIELDS = (
    "username", "password", "will_flag", "will_retain", "will_qos", "will_topic", "will_message", "keep_alive",
)  # fmt: skip
_deferred_deletes: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("deferred", default=None)
_LOGIN = "_fieldlink_login_ok"  # the verdict, kept on the session from its CONNECT to amqtt's own check


class LoginBroker(Broker):
    """amqtt's Broker with two fixes that logins and topic rules need (amqtt 0.12.1, pinned).

    1. amqtt applies a CONNECT to the session of its client id before it checks the
       password. With a clean session, a wrong password and another client's id, that
       client's subscriptions were deleted (it heard nothing from then on, untold) and
       the refused session took its place in the broker's table, so the tap's user lookup
       returned the user name the refused CONNECT claimed. With a persistent session, the
       live connection was taken over (closed) and the session kept the claimed user name
       and will. Here the password is checked first, and a refused CONNECT leaves every
       session as it was.
    2. amqtt sends every connecting client the retained messages of every subscription in
       the broker, other clients' included: past any topic rule. Here a client gets those
       of its own subscriptions only.
    """

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        before = {
            client_id: (s, [getattr(s, f) for f in _CONNECT_FIELDS]) for client_id, (s, _) in self._sessions.items()
        }
        deletes: list[str] = []
        token = _deferred_deletes.set(deletes)  # this connection's task only
        try:
            handler, session = await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        finally:
            _deferred_deletes.reset(token)
        accepted = await super()._authenticate(session, None)  # type: ignore[arg-type]  (the listener is unused)
        if accepted:
            for client_id in deletes:
                await super()._delete_session(client_id)
        else:
            old = before.get(session.client_id or "")
            if old is not None and old[0] is session:  # a persistent session the CONNECT had rewritten
                for name, value in zip(_CONNECT_FIELDS, old[1], strict=True):
                    setattr(session, name, value)
        setattr(session, _LOGIN, accepted)
        return handler, session

    async def _delete_session(self, client_id: str) -> None:
        deferred = _deferred_deletes.get()
        if deferred is None:
            await super()._delete_session(client_id)
        else:
            deferred.append(client_id)  # until the password is known to be right

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        verdict = getattr(session, _LOGIN, None)
        if verdict is None:
            return await super()._authenticate(session, listener)
        delattr(session, _LOGIN)  # checked when the CONNECT came in
        return bool(verdict)

    async def _handle_client_session(
        self, reader: Any, writer: Any, client_session: Session, handler: BrokerProtocolHandler, *rest: Any
    ) -> None:
        if getattr(client_session, _LOGIN, None) is False:
            delattr(client_session, _LOGIN)
            refused = Session()  # answered on a session of its own: the one of that client id stays untouched
            refused.client_id = client_session.client_id
            handler.attach(refused, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            return
        await super()._handle_client_session(reader, writer, client_session, handler, *rest)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        holders = self._subscriptions.get(subscription[0], [])
        if any(held.client_id == session.client_id for held, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)
