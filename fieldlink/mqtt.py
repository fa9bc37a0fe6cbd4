"""paho-mqtt bridged into asyncio, one object per connection.

paho's socket is registered with the running event loop (the pattern aiomqtt uses),
so every callback runs on the loop thread: no network thread, no locks. Only the
blocking TCP connect and TLS handshake run in an executor.

A :class:`MqttConnection` is one session: open it, use it, and when ``closed``
resolves it is finished; the caller builds a new one to reconnect. That keeps
reconnection policy (backoff, replay from our own buffer) in the caller, and means
paho never replays messages behind our back.

TLS (``mqtts://``), client certificates, user name and password, MQTT 3.1.1 and 5
are all settings of :class:`MqttSettings`. Every way a connect can fail ends as one
:class:`ConnectFailed` whose ``reason`` is a single line saying what to fix: an
untrusted or expired certificate, a refused client certificate, a bad password.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, LogLevel, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field, SecretStr, ValidationInfo, field_validator

from fieldlink.configkit import Duration, Schema

__all__ = [
    "ConnectFailed",
    "ConnectionLost",
    "Message",
    "MqttConnection",
    "MqttError",
    "MqttSettings",
    "PublishRefused",
    "TlsSettings",
    "Will",
    "parse_broker_url",
]

Message = paho.MQTTMessage
READ_BURST = 64  # packets read per readable event, at most


class MqttError(Exception):
    """Base of everything this adapter raises."""


class ConnectFailed(MqttError):
    """The broker could not be reached or refused the session; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectionLost(MqttError):
    """The session ended while an operation was waiting on it."""


class PublishRefused(MqttError):
    """MQTT 5 only: the broker answered a QoS 1 publish with a failure reason code.

    The message was not accepted (typically an ACL denies the topic); MQTT 3.1.1
    has no way to say so and acknowledges it like any other.
    """


# --- settings --------------------------------------------------------------------------

_PLAIN_SCHEMES = {"mqtt": 1883, "tcp": 1883}
_TLS_SCHEMES = {"mqtts": 8883, "ssl": 8883}


def _split_url(url: str) -> tuple[bool, str, int]:
    """(uses TLS, host, port) from a broker URL; ValueError says what is wrong with it."""
    parts = urlsplit(url)
    default_port = _PLAIN_SCHEMES.get(parts.scheme) or _TLS_SCHEMES.get(parts.scheme)
    if default_port is None:
        # The message predates TLS support and is matched by tests and docs; mqtts:// and
        # ssl:// are documented next to it.
        raise ValueError(f"must start with mqtt:// or tcp://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"has no host, got {url!r}")
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"has an invalid port, got {url!r}") from None
    return parts.scheme in _TLS_SCHEMES, parts.hostname, port


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` to (host, port): 1883 by default, 8883 for ``mqtts://`` and ``ssl://``."""
    _, host, port = _split_url(url)
    return host, port


def _readable_file(path: Path) -> str:
    """The file's text; ValueError naming the path if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


def _refuse_key_password() -> bytes:
    # Without a password callback OpenSSL prompts on the terminal for an encrypted key,
    # which would hang a service; fail with a message instead.
    raise ValueError("the key is encrypted; give an unencrypted key (protect it with file permissions)")


class TlsSettings(Schema):
    """``[uplink.tls]`` / ``[broker.tls]``: trust and identity for ``mqtts://``.

    Files are checked when the config is loaded (so ``check-config`` reports them
    with their dotted key) and read again on every connect, so a renewed
    certificate is picked up by the next reconnect without a restart.
    """

    ca_file: Path | None = None  # CA certificates (PEM) that sign the broker; None: the system's
    cert_file: Path | None = None  # our client certificate (PEM), for brokers that require one
    # validate_default: the "cert_file needs key_file" check must run when key_file is absent.
    key_file: Path | None = Field(default=None, validate_default=True)
    server_name: str | None = None  # the name to verify (and send as SNI) instead of the URL's host

    @field_validator("ca_file")
    @classmethod
    def _loadable_ca(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        _readable_file(path)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        except ssl.SSLError:
            raise ValueError(f"{path} holds no PEM CA certificate") from None
        return path

    @field_validator("cert_file")
    @classmethod
    def _loadable_cert(cls, path: Path | None) -> Path | None:
        if path is not None and "-----BEGIN CERTIFICATE-----" not in _readable_file(path):
            raise ValueError(f"{path} holds no PEM certificate")
        return path

    @field_validator("key_file")
    @classmethod
    def _key_matches_cert(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if "cert_file" not in info.data:
            return path  # cert_file itself is wrong and already reported
        cert: Path | None = info.data["cert_file"]
        if path is None:
            if cert is not None:
                raise ValueError("required key is missing: cert_file is set, and needs its private key")
            return None
        if cert is None:
            raise ValueError("cert_file is missing: a client key needs its certificate")
        _readable_file(path)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, path, password=_refuse_key_password)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(f"{path} is not the key of cert_file {cert}") from None
            raise ValueError(f"{path} holds no usable PEM private key") from None
        return path

    @field_validator("server_name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        if name is not None and (not name or any(c.isspace() or c in "/:" for c in name)):
            raise ValueError(f"must be a host name or IP address, got {name!r}")
        return name


def _protocol_from_toml(value: Any) -> Any:
    # `protocol = 5` is the natural thing to write in TOML; "3.1.1" can only be a string.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class MqttSettings(Schema):
    """How to reach one MQTT broker. Shared by the gateway uplink and the cloud."""

    url: str = "mqtt://127.0.0.1:1883"
    client_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    tls: TlsSettings | None = None
    keepalive: Duration = 30.0
    connect_timeout: Duration = 10.0
    max_inflight: int = Field(default=50, ge=1, le=65535)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        _split_url(url)
        return url

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_number(cls, value: Any) -> Any:
        return _protocol_from_toml(value)

    @field_validator("tls")
    @classmethod
    def _tls_needs_tls_url(cls, tls: TlsSettings | None, info: ValidationInfo) -> TlsSettings | None:
        url = info.data.get("url")
        if tls is not None and url is not None and not _split_url(url)[0]:
            # Ignoring the table would send the password in clear text to a broker
            # the operator meant to reach over TLS.
            raise ValueError(f"set, but url {url!r} is not mqtts:// or ssl://: TLS is chosen by the url")
        return tls

    @property
    def address(self) -> tuple[str, int]:
        return parse_broker_url(self.url)

    @property
    def uses_tls(self) -> bool:
        return _split_url(self.url)[0]


# --- TLS -------------------------------------------------------------------------------


class _TlsContext(ssl.SSLContext):
    """An SSLContext that verifies, and sends as SNI, ``server_name`` instead of the URL's host.

    paho wraps its socket with ``server_hostname=<the host it connects to>``; this is
    the one place where another name can be put in without connecting by that name.
    """

    server_name: str | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        if self.server_name is not None:
            kwargs["server_hostname"] = self.server_name  # paho passes it by keyword
        return super().wrap_socket(*args, **kwargs)


def build_tls_context(tls: TlsSettings | None) -> ssl.SSLContext:
    """A client context: verify the broker (against ca_file or the system CAs), offer our certificate.

    Raises ConnectFailed if a file that passed the config check can no longer be used.
    """
    tls = tls or TlsSettings()
    # PROTOCOL_TLS_CLIENT: certificate and host name checks on, TLS 1.2 at least;
    # the same as ssl.create_default_context(), but of our class.
    context = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    context.server_name = tls.server_name
    try:
        if tls.ca_file is not None:
            context.load_verify_locations(cafile=tls.ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ValueError) as exc:
        what = f"tls.ca_file {tls.ca_file}" if tls.ca_file else "the system CA certificates"
        raise ConnectFailed(f"cannot load {what}: {_error_text(exc)}") from None
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file, password=_refuse_key_password)
        except (OSError, ValueError) as exc:
            raise ConnectFailed(
                f"cannot load tls.cert_file {tls.cert_file} / tls.key_file {tls.key_file}: {_error_text(exc)}"
            ) from None
    return context


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return _words(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _words(reason: str) -> str:
    """'SSLV3_ALERT_CERTIFICATE_EXPIRED' -> 'certificate expired'."""
    for prefix in ("SSLV3_ALERT_", "TLSV13_ALERT_", "TLSV1_ALERT_"):
        reason = reason.removeprefix(prefix)
    return reason.replace("_", " ").lower()


# OpenSSL X509_V_ERR_* codes of the broker's certificate (ssl.SSLCertVerificationError.verify_code).
_X509_NOT_YET_VALID = 9
_X509_EXPIRED = 10
_X509_UNTRUSTED = {
    2,  # unable to get issuer certificate
    18,  # self-signed certificate
    19,  # self-signed certificate in certificate chain
    20,  # unable to get local issuer certificate
    21,  # unable to verify the first certificate
}
_X509_NAME_MISMATCH = {62, 64}  # host name mismatch, IP address mismatch

# TLS alerts by which a broker refuses our client certificate (ssl.SSLError.reason).
_CLIENT_CERT_REFUSED = {
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_ACCESS_DENIED",
}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LENGTH_MISMATCH"}


def describe_tls_error(exc: OSError, tls: TlsSettings | None, host: str, port: int) -> str:
    """One line for an operator: what went wrong in the TLS handshake, and what to change."""
    tls = tls or TlsSettings()
    where = f"{host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _untrusted_server(exc, tls, host, where)
    reason = exc.reason if isinstance(exc, ssl.SSLError) else None
    if reason is not None and (refused := _refused_client_cert(reason, tls, where)):
        return refused
    if reason in {"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"}:
        return f"TLS: {where} and we have no TLS version in common (we need TLS 1.2 or newer)"
    if reason in _NOT_TLS:
        return f"TLS: {where} does not speak TLS: use mqtt:// for a plain listener, or the broker's TLS port"
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError) or (
        reason == "UNEXPECTED_EOF_WHILE_READING"
    ):
        return f"TLS: {where} closed the connection during the TLS handshake (is it a TLS port? its log says why)"
    if reason:
        return f"TLS: handshake with {where} failed: {_words(reason)}"
    return f"TLS: handshake with {where} failed: {_error_text(exc)}"


def _untrusted_server(exc: ssl.SSLCertVerificationError, tls: TlsSettings, host: str, where: str) -> str:
    detail = exc.verify_message or _error_text(exc)
    code = exc.verify_code
    if code in _X509_UNTRUSTED:
        trust = f"tls.ca_file {tls.ca_file}" if tls.ca_file else "the system CA certificates"
        return (
            f"TLS: the server certificate of {where} is not trusted by {trust} ({detail}); "
            "set tls.ca_file to the CA that signed the broker's certificate"
        )
    if code in _X509_NAME_MISMATCH:
        return (
            f"TLS: the server certificate of {where} is not valid for the name {tls.server_name or host!r} "
            f"({detail}); put a name the certificate lists in the url, or set tls.server_name"
        )
    clock = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if code == _X509_EXPIRED:
        return (
            f"TLS: the server certificate of {where} has expired (this device's clock says {clock}); "
            "renew the broker's certificate, or fix this device's clock"
        )
    if code == _X509_NOT_YET_VALID:
        return (
            f"TLS: the server certificate of {where} is not valid yet (this device's clock says {clock}); "
            "fix this device's clock"
        )
    return f"TLS: the server certificate of {where} failed verification: {detail}"


def _refused_client_cert(reason: str, tls: TlsSettings, where: str) -> str | None:
    """The message for an alert by which the broker refuses our client certificate, else None."""
    ours = f"our client certificate (tls.cert_file {tls.cert_file})"
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED" or (
        reason == "SSLV3_ALERT_HANDSHAKE_FAILURE" and tls.cert_file is None
    ):
        # TLS 1.2 has no "certificate required" alert: a broker that demands one sends
        # handshake_failure, which is what it means when we offered none.
        return f"TLS: {where} requires a client certificate and we sent none: set tls.cert_file and tls.key_file"
    if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        return f"TLS: {where} refused {ours}: the certificate expired; issue a new one"
    if reason == "SSLV3_ALERT_CERTIFICATE_REVOKED":
        return f"TLS: {where} refused {ours}: the certificate was revoked"
    if reason == "TLSV1_ALERT_UNKNOWN_CA":
        return f"TLS: {where} refused {ours}: it is not signed by a CA the broker trusts (the broker's cafile)"
    if reason in _CLIENT_CERT_REFUSED:
        return f"TLS: {where} refused {ours}: {_words(reason)}"
    return None


def _pending_tls_alert(sock: Any) -> ssl.SSLError | None:
    """A TLS alert the broker sent but nobody read yet, if `sock` still holds one."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        sock.setblocking(False)
        sock.recv(1)
    except ssl.SSLWantReadError:
        return None
    except ssl.SSLError as exc:
        return exc if exc.reason else None
    except OSError:
        return None
    return None


# --- CONNACK refusals ------------------------------------------------------------------

_BAD_CREDENTIALS = 134
_NOT_AUTHORIZED = 135


def describe_refusal(reason: ReasonCode, settings: MqttSettings, client_id: str) -> str:
    """One line for a CONNACK failure (MQTT 3.1.1 return codes arrive mapped to v5 reason codes)."""
    code = reason.value
    prefix = "broker refused the connection"
    user = f"user {settings.username!r}"
    if code == _BAD_CREDENTIALS:
        return f"{prefix}: bad username or password ({user})"
    if code == _NOT_AUTHORIZED:
        if settings.username is None:
            return f"{prefix}: not authorized; the broker requires a username and password (none set)"
        # mosquitto answers a wrong password with "not authorized" (3.1.1: 5, v5: 135), not with
        # "bad user name or password", so that is the likely cause; an ACL is the other.
        return f"{prefix}: bad username or password, or {user} may not connect (not authorized)"
    if code == 132:
        return f"{prefix}: it does not support MQTT {settings.protocol}: set protocol to another version"
    if code == 133:
        return f"{prefix}: client id {client_id!r} is not valid"
    if code == 138:
        return f"{prefix}: this client is banned"
    return f"{prefix}: {str(reason).lower()} (reason code {code})"


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
        self._client_id = client_id
        self._clean_session = clean_session
        self._v5 = settings.protocol == "5"
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            # MQTT 5 has no clean session flag: clean_start and the session expiry
            # interval, given to connect(), say the same thing.
            clean_session=None if self._v5 else clean_session,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
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
        # QoS 1 messages that may be unacknowledged at once: settings.max_inflight, lowered
        # to the broker's Receive Maximum (MQTT 5) once connected. Publishing more is
        # allowed; paho holds the excess back until PUBACKs arrive.
        self.max_inflight = settings.max_inflight
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self._pending_publish: dict[int, asyncio.Future[None]] = {}
        self._publish_topics: dict[int, str] = {}  # for the message of a refused publish
        self._early_publish: dict[int, ReasonCode] = {}
        self._pending_subscribe: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._misc_task: asyncio.Task[None] | None = None
        self._socket: Any = None
        self._aborted = False
        self._io_error: OSError | None = None  # why paho's last read or write failed, before CONNACK

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
        c.on_log = self._on_log  # until CONNACK only: see _on_log

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and wait for CONNACK; raise ConnectFailed with the reason otherwise."""
        settings = self._settings
        host, port = settings.address
        timeout = settings.connect_timeout
        self._client.connect_timeout = timeout
        keepalive = max(5, round(settings.keepalive))
        extra: dict[str, Any] = {}
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)
            if not self._clean_session:
                # A v3.1.1 persistent session lasts until the client cleans it; the v5
                # equivalent is the largest expiry interval, which means "never expires".
                properties.SessionExpiryInterval = 0xFFFFFFFF
            extra = {"clean_start": self._clean_session, "properties": properties}

        def connect() -> None:
            # In the executor: reading certificate files and the TLS handshake block.
            if settings.uses_tls:
                self._client.tls_set_context(build_tls_context(settings.tls))
            self._client.connect(host, port, keepalive, **extra)

        try:
            async with asyncio.timeout(timeout):
                await self._loop.run_in_executor(None, connect)
                await self._connack
        except TimeoutError:
            self.abort()
            raise ConnectFailed(f"no answer from {host}:{port} within {timeout:g}s") from None
        except ssl.SSLError as exc:
            raise ConnectFailed(describe_tls_error(exc, settings.tls, host, port)) from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            if settings.uses_tls:  # reset by the peer in the middle of our handshake
                raise ConnectFailed(describe_tls_error(exc, settings.tls, host, port)) from None
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
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
        self._aborted = True
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
        early = self._early_publish.pop(info.mid, None)
        if early is not None:
            self._settle_publish(future, early, topic)
        else:
            self._pending_publish[info.mid] = future
            self._publish_topics[info.mid] = topic
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
            if sock.fileno() == -1:
                return  # closed before the loop got to it; on_socket_close reports why
            self._socket = sock
            self._loop.add_reader(sock, self._readable, client, sock)
            self._misc_task = self._loop.create_task(self._misc_loop())
            if self.closed.done():
                # open() gave up (timeout) while the executor was still connecting: end
                # this late socket the usual way instead of leaving a session behind.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        self._call_on_loop(register)

    def _readable(self, client: paho.Client, sock: Any) -> None:
        # paho reads one packet per call. Read on while calls deliver messages (a few dozen at
        # most, so writes and timers keep their turn): a loop iteration per packet made a
        # backlog trickle into ``messages`` one by one, and consumers batch what they find there.
        for _ in range(READ_BURST):
            queued = self.messages.qsize()
            client.loop_read()
            if self._socket is not sock or self.messages.qsize() == queued:
                break
        # TLS: OpenSSL may hold decrypted bytes the file descriptor no longer shows (a
        # broker that packs several MQTT packets into one record); paho's own loop checks
        # pending() for the same reason. Read on until they are consumed or the socket closed.
        while self._socket is sock and isinstance(sock, ssl.SSLSocket) and sock.pending():
            client.loop_read()

    def _on_socket_close(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        # paho calls this just before it closes `sock`. Closed before CONNACK, a TLS
        # socket may still hold the broker's alert saying why: with TLS 1.3 a refused
        # client certificate arrives after our handshake completed, and when our write
        # of CONNECT failed first, paho never read it.
        alert = _pending_tls_alert(sock) if not self._connack.done() else None

        def unregister() -> None:
            if self._socket is sock:  # not when it closed before register() ran
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
                self._socket = None
            if self._misc_task is not None:
                self._misc_task.cancel()
            # paho reports a lost connection through on_disconnect; a socket closed
            # before CONNACK only shows up here.
            self._finish("connection closed" if self._connack.done() else self._closed_before_connack(alert))

        self._call_on_loop(unregister)

    def _closed_before_connack(self, alert: ssl.SSLError | None) -> str:
        if self._aborted:
            return "aborted"
        host, port = self._settings.address
        error = self._io_error
        if not (isinstance(error, ssl.SSLError) and error.reason) and alert is not None:
            error = alert  # the alert says more than "EOF" or "broken pipe"
        if error is not None and self._settings.uses_tls:
            return describe_tls_error(error, self._settings.tls, host, port)
        detail = f" ({error.strerror or error})" if error is not None else ""
        hint = "" if self._settings.uses_tls else "; if that port is a TLS listener, use mqtts://"
        return f"{host}:{port} closed the connection before answering CONNECT{detail}{hint}"

    def _on_log(self, _client: paho.Client, _userdata: Any, level: int, _text: str) -> None:
        # paho logs a failed socket read or write from inside its `except OSError:` block,
        # then drops the exception and closes the socket. Before CONNACK that exception is
        # the only account of why the broker hung up (a TLS alert refusing our client
        # certificate, for one), so keep it. After CONNACK on_log is removed: paho formats
        # every debug line for it, on the publish path.
        if level == LogLevel.MQTT_LOG_ERR and self._io_error is None:
            error = sys.exception()
            if isinstance(error, OSError):
                self._io_error = error

    def _on_socket_register_write(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        def register() -> None:
            # From the executor (CONNECT is queued inside connect()) this runs later, and the
            # socket may be closed by then: the broker can refuse us before we write anything.
            if self._socket is sock:
                self._loop.add_writer(sock, client.loop_write)

        self._call_on_loop(register)

    def _on_socket_unregister_write(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        def unregister() -> None:
            if self._socket is sock:
                self._loop.remove_writer(sock)

        self._call_on_loop(unregister)

    async def _misc_loop(self) -> None:
        # Keepalive pings and PINGRESP timeouts are paho's job, driven from here.
        while self._client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1)

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        client.on_log = None
        if self._connack.done():
            return
        if reason.is_failure:
            refusal = describe_refusal(reason, self._settings, self._client_id)
            self._connack.set_exception(ConnectFailed(refusal))
            self._connack.exception()  # retrieved here so an unawaited future never warns
            return
        self.session_present = bool(flags.session_present)
        # An MQTT 5 broker may cap our unacknowledged QoS 1 messages (Receive Maximum:
        # EMQX 32, HiveMQ 10 by default) and disconnect a client that exceeds it. paho
        # neither applies the cap nor lets max_inflight_messages_set() change a connected
        # client, so the attribute is set directly: safe here, as nothing was published yet.
        receive_maximum = getattr(props, "ReceiveMaximum", None) if self._v5 else None
        if receive_maximum is not None and receive_maximum < self.max_inflight:
            client._max_inflight_messages = receive_maximum
            self.max_inflight = receive_maximum
        self._connack.set_result(None)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
        self._finish(f"disconnected: {reason}")

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, reason: ReasonCode, _props: Any) -> None:
        future = self._pending_publish.pop(mid, None)
        topic = self._publish_topics.pop(mid, "")
        if future is None:
            # A QoS 0 message is "published" inside paho's publish(), before we have a future.
            self._early_publish[mid] = reason
        else:
            self._settle_publish(future, reason, topic)

    @staticmethod
    def _settle_publish(future: asyncio.Future[None], reason: ReasonCode, topic: str) -> None:
        if future.done():
            return
        # Only MQTT 5 PUBACKs carry a failure (>= 0x80); "no matching subscribers" (0x10) is a success.
        if reason.is_failure:
            future.set_exception(PublishRefused(f"broker refused the message to {topic}: {str(reason).lower()}"))
            future.exception()
        else:
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
        self._publish_topics.clear()
        self._pending_subscribe.clear()
