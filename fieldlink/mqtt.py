"""paho-mqtt bridged into asyncio, one object per connection.

paho's socket is registered with the running event loop (the pattern aiomqtt uses),
so every callback runs on the loop thread: no network thread, no locks. Only the
blocking TCP (and later TLS) connect runs in an executor.

A :class:`MqttConnection` is one session: open it, use it, and when ``closed``
resolves it is finished; the caller builds a new one to reconnect. That keeps
reconnection policy (backoff, replay from our own buffer) in the caller, and means
paho never replays messages behind our back.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, SecretStr, field_validator

from fieldlink.configkit import Duration, Schema

__all__ = [
    "ConnectFailed",
    "ConnectionLost",
    "Message",
    "MqttConnection",
    "MqttError",
    "MqttSettings",
    "Will",
    "parse_broker_url",
]

Message = paho.MQTTMessage


class MqttError(Exception):
    """Base of everything this adapter raises."""


class ConnectFailed(MqttError):
    """The broker could not be reached or refused the session; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectionLost(MqttError):
    """The session ended while an operation was waiting on it."""


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` (or ``tcp://``) to (host, port); the port defaults to 1883."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "tcp"}:
        raise ValueError(f"must start with mqtt:// or tcp://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"has no host, got {url!r}")
    try:
        port = parts.port or 1883
    except ValueError:
        raise ValueError(f"has an invalid port, got {url!r}") from None
    return parts.hostname, port


class MqttSettings(Schema):
    """How to reach one MQTT broker. Shared by the gateway uplink and the cloud."""

    url: str = "mqtt://127.0.0.1:1883"
    client_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    keepalive: Duration = 30.0
    connect_timeout: Duration = 10.0
    max_inflight: int = Field(default=50, ge=1, le=65535)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        parse_broker_url(url)
        return url

    @property
    def address(self) -> tuple[str, int]:
        return parse_broker_url(self.url)


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttConnection:
    """One MQTT session over a paho client driven by the asyncio loop."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        clean_session: bool = True,
        will: Will | None = None,
        manual_ack: bool = False,
    ) -> None:
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=manual_ack,
        )
        self._client.max_inflight_messages_set(settings.max_inflight)
        self._client.max_queued_messages_set(0)
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            self._client.username_pw_set(settings.username, password)
        if will is not None:
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)

        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self.session_present = False
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self._pending_publish: dict[int, asyncio.Future[None]] = {}
        self._early_publish: set[int] = set()
        self._pending_subscribe: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._misc_task: asyncio.Task[None] | None = None
        self._socket: Any = None

        c = self._client
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_socket_register_write
        c.on_socket_unregister_write = self._on_socket_unregister_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and wait for CONNACK; raise ConnectFailed with the reason otherwise."""
        host, port = self._settings.address
        timeout = self._settings.connect_timeout
        self._client.connect_timeout = timeout
        try:
            async with asyncio.timeout(timeout):
                await self._loop.run_in_executor(
                    None, self._client.connect, host, port, max(5, round(self._settings.keepalive))
                )
                await self._connack
        except TimeoutError:
            self.abort()
            raise ConnectFailed(f"no answer from {host}:{port} within {timeout:g}s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None

    async def close(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly (the broker discards the will); drop the socket if that stalls."""
        if self.closed.done():
            return
        self._client.disconnect()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self.abort()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self.closed)
        self._finish("closed by us")

    def abort(self) -> None:
        """Cut the connection without DISCONNECT (the broker publishes the will)."""
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        else:
            self._finish("aborted")

    @property
    def is_open(self) -> bool:
        return self._connack.done() and not self._connack.exception() and not self.closed.done()

    # --- operations ----------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> asyncio.Future[None]:
        """Queue a message; the future resolves on PUBACK (QoS 1) or once written (QoS 0)."""
        if self.closed.done():
            raise ConnectionLost(self.closed.result())
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_QUEUE_SIZE):
            raise ConnectionLost(paho.error_string(info.rc))
        future: asyncio.Future[None] = self._loop.create_future()
        if info.mid in self._early_publish:
            self._early_publish.discard(info.mid)
            future.set_result(None)
        else:
            self._pending_publish[info.mid] = future
        return future

    async def subscribe(self, filters: list[tuple[str, int]]) -> None:
        if not filters:
            return
        result, mid = self._client.subscribe(filters)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionLost(paho.error_string(result))
        future: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._pending_subscribe[mid] = future
        codes = await future
        refused = [f for (f, _), code in zip(filters, codes, strict=False) if code.is_failure]
        if refused:
            raise MqttError(f"broker refused subscription to {', '.join(refused)}")

    def ack(self, message: Message) -> None:
        """Acknowledge a message received with ``manual_ack=True``."""
        if not self.closed.done():
            self._client.ack(message.mid, message.qos)

    # --- paho callbacks (on the loop thread, except during connect) -----------------------

    def _call_on_loop(self, fn: Callable[[], None]) -> None:
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def _on_socket_open(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        def register() -> None:
            self._socket = sock
            self._loop.add_reader(sock, client.loop_read)
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._call_on_loop(register)

    def _on_socket_close(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        def unregister() -> None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            self._socket = None
            if self._misc_task is not None:
                self._misc_task.cancel()
            # paho reports a lost connection through on_disconnect; a socket closed
            # before CONNACK only shows up here.
            self._finish("connection closed")

        self._call_on_loop(unregister)

    def _on_socket_register_write(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._call_on_loop(lambda: self._loop.add_writer(sock, client.loop_write))

    def _on_socket_unregister_write(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._call_on_loop(lambda: self._loop.remove_writer(sock))

    async def _misc_loop(self) -> None:
        # Keepalive pings and PINGRESP timeouts are paho's job, driven from here.
        while self._client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1)

    def _on_connect(self, _c: paho.Client, _u: Any, flags: Any, reason: ReasonCode, _props: Any) -> None:
        if self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(ConnectFailed(f"broker refused the connection: {reason}"))
            self._connack.exception()  # retrieved here so an unawaited future never warns
        else:
            self.session_present = bool(flags.session_present)
            self._connack.set_result(None)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
        self._finish(f"disconnected: {reason}")

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
        future = self._pending_publish.pop(mid, None)
        if future is None:
            self._early_publish.add(mid)
        elif not future.done():
            future.set_result(None)

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:
        future = self._pending_subscribe.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(codes)

    def _on_message(self, _c: paho.Client, _u: Any, message: Message) -> None:
        self.messages.put_nowait(message)

    def _finish(self, reason: str) -> None:
        if self.closed.done():
            return
        self.closed.set_result(reason)
        if not self._connack.done():
            self._connack.set_exception(ConnectFailed(reason))
            self._connack.exception()
        lost = ConnectionLost(reason)
        for future in [*self._pending_publish.values(), *self._pending_subscribe.values()]:
            if not future.done():
                future.set_exception(lost)
                future.exception()
        self._pending_publish.clear()
        self._pending_subscribe.clear()
