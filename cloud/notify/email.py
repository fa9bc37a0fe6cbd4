"""Email through an SMTP relay: smtplib on a worker thread, plain, STARTTLS or implicit TLS, with login.

One message per payload goes to every ``to`` address (targets() is ``["mail"]``).
The engine wrote ``subject`` and ``body``; this module adds the headers: From, To,
Subject, Date, a ``Message-ID`` that is the same for every attempt of one alert
transition and receiver (a relay or mail client that deduplicates recognises a
repeat after a lost answer), and ``X-Fieldlink-Alert-Key`` for mail filters.

smtplib rather than aiosmtplib: sending is one short conversation per alert, a
worker thread costs nothing at that rate, and smtplib is the standard library
(aiosmtplib would be a new dependency for no gain here).
"""

from __future__ import annotations

import asyncio
import email.policy
import hashlib
import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SecretStr, ValidationInfo, field_validator

from cloud.notify.base import (
    CaFile,
    NotifyFailed,
    certificate_problem,
    client_tls_context,
    payload_text,
    unknown_target,
)
from cloud.notify.registry import register_notifier
from fieldlink.configkit import Duration, Port, Schema

__all__ = ["EmailConfig", "EmailNotifier", "message_id"]

log = logging.getLogger(__name__)

TARGET = "mail"
# The usual port of each kind of connection (RFC 8314: 465 implicit TLS, 587 submission).
DEFAULT_PORTS = {"none": 25, "starttls": 587, "implicit": 465}
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# How OpenSSL versions name a server that answered a TLS hello with "220 ..." in plain text.
_PLAIN_TEXT_ANSWER = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL"})


def _address(value: str) -> str:
    """``alerts@example.com`` or ``fieldlink <alerts@example.com>``."""
    _, address = parseaddr(value)
    if "@" not in address or any(c.isspace() for c in address):
        raise ValueError(f"must be an email address such as 'ops@example.com', got {value!r}")
    return value


MailAddress = Annotated[str, AfterValidator(_address)]


class EmailConfig(Schema):
    kind: Literal["email"]
    name: str = Field(min_length=1)
    host: str = Field(min_length=1)
    tls: Literal["none", "starttls", "implicit"] = "none"
    port: Port | None = None  # None: 25, 587 or 465 for tls none, starttls, implicit
    ca_file: CaFile | None = None  # trust this CA instead of the system's (a private relay)
    username: str | None = None
    password: SecretStr | None = Field(default=None, validate_default=True)  # or password_file
    sender: MailAddress = Field(alias="from")
    to: list[MailAddress] = Field(min_length=1)
    timeout: Duration = 10.0
    # Replaced by `tls`; kept only to say so instead of "unknown key".
    starttls: bool | None = Field(default=None, exclude=True, repr=False)

    @field_validator("password")
    @classmethod
    def _credentials(cls, password: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if "username" not in info.data or "tls" not in info.data or "host" not in info.data:
            return password  # reported on its own key already
        username = info.data["username"]
        if username is not None and password is None:
            raise ValueError("required key is missing: username is set (or give password_file)")
        if username is None and password is not None:
            raise ValueError("username is missing: a password needs its user name")
        if username is not None and info.data["tls"] == "none" and info.data["host"] not in _LOOPBACK_HOSTS:
            raise ValueError('would cross the network in clear: set tls = "starttls" or "implicit"')
        return password

    @field_validator("starttls")
    @classmethod
    def _replaced(cls, value: bool | None) -> None:
        if value is not None:
            raise ValueError('replaced by tls = "starttls" (or "implicit" for SMTPS on 465, "none")')

    @property
    def smtp_port(self) -> int:
        return self.port if self.port is not None else DEFAULT_PORTS[self.tls]


# Subjects name device, value and threshold, so they run past 78 characters; the default
# policy then folds them (a leading space after unfolding). RFC 5322 allows 998.
# cte_type 7bit: a body with "°C" goes quoted-printable, so a relay without 8BITMIME takes it.
_POLICY = email.policy.default.clone(max_line_length=998, cte_type="7bit")


def message_id(key: str, target: str) -> str:
    """Stable per (alert transition and receiver, target): every attempt of one mail has the same id."""
    return f"<{hashlib.sha256((key + target).encode()).hexdigest()[:32]}@fieldlink>"


class EmailNotifier:
    def __init__(self, config: EmailConfig) -> None:
        self.config = config
        self.name = config.name

    def targets(self) -> list[str]:
        return [TARGET]

    def build_message(self, payload: dict[str, Any], target: str = TARGET) -> EmailMessage:
        cfg = self.config
        key = payload_text(payload, "key")
        message = EmailMessage(policy=_POLICY)
        message["From"] = cfg.sender
        message["To"] = ", ".join(cfg.to)
        # One line by contract; a stray newline must not end the headers early.
        message["Subject"] = " ".join(payload_text(payload, "subject").split())
        message["Date"] = formatdate(usegmt=True)
        message["Message-ID"] = message_id(key, target)
        message["X-Fieldlink-Alert-Key"] = key
        message.set_content(payload_text(payload, "body"))
        return message

    async def send(self, payload: dict[str, Any], target: str) -> None:
        if target != TARGET:
            raise unknown_target(self.name, target, self.targets())
        message = self.build_message(payload, target)
        refused = await asyncio.to_thread(self._deliver, message)
        if refused:
            # The others have it; sending again would repeat it to them, and these
            # addresses would most likely be refused again. Say so loudly instead.
            log.warning(
                "mail delivered, but the relay refused some recipients",
                extra={"notifier": self.name, "refused": _describe(refused), "message_id": message["Message-ID"]},
            )

    def _deliver(self, message: EmailMessage) -> dict[str, tuple[int, bytes]]:
        cfg = self.config
        where = f"email {self.name!r}: SMTP {cfg.host}:{cfg.smtp_port}"
        envelope_to = [parseaddr(address)[1] for address in cfg.to]
        try:
            context = client_tls_context(cfg.ca_file) if cfg.tls != "none" else None
        except OSError as exc:  # readable at load time, not any more: retried until it is put back
            raise NotifyFailed(f"{where}: cannot load ca_file {cfg.ca_file}: {exc}") from None
        try:
            with self._connect(context) as smtp:
                if cfg.tls == "starttls":
                    smtp.starttls(context=context)
                if cfg.username is not None and cfg.password is not None:
                    smtp.login(cfg.username, cfg.password.get_secret_value())
                refused = smtp.send_message(message, from_addr=parseaddr(cfg.sender)[1], to_addrs=envelope_to)
        except smtplib.SMTPRecipientsRefused as exc:
            # Every recipient refused. 4xx (greylisting, mailbox busy) may pass later; 5xx will not.
            permanent = all(code >= 500 for code, _ in exc.recipients.values())
            raise NotifyFailed(
                f"{where}: every recipient refused: {_describe(exc.recipients)}", permanent=permanent
            ) from None
        except smtplib.SMTPNotSupportedError as exc:
            hint = " (most relays offer AUTH only after STARTTLS)" if cfg.tls == "none" else ""
            raise NotifyFailed(f"{where}: {exc}{hint}", permanent=True) from None
        except smtplib.SMTPResponseException as exc:
            # 5xx: refused for good (failed login, sender or content rejected); 4xx: try again later.
            text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
            raise NotifyFailed(f"{where}: {exc.smtp_code} {text}", permanent=exc.smtp_code >= 500) from None
        except ssl.SSLError as exc:
            raise certificate_problem(exc, cfg.ca_file, where) or _tls_failure(where, exc, cfg.tls) from None
        except (smtplib.SMTPException, OSError) as exc:
            # smtplib reports a read timeout as SMTPServerDisconnected; the timeout is its context.
            if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
                raise NotifyFailed(f"{where}: no answer within {cfg.timeout:g} s") from None
            # Refused, reset, disconnected, name not resolved: the relay may be back later.
            raise NotifyFailed(f"{where}: unreachable: {exc}") from None
        return refused

    def _connect(self, context: ssl.SSLContext | None) -> smtplib.SMTP:
        cfg = self.config
        if cfg.tls == "implicit":
            return smtplib.SMTP_SSL(cfg.host, cfg.smtp_port, timeout=cfg.timeout, context=context)
        return smtplib.SMTP(cfg.host, cfg.smtp_port, timeout=cfg.timeout)


def _tls_failure(where: str, exc: ssl.SSLError, tls: str) -> NotifyFailed:
    if exc.reason in _PLAIN_TEXT_ANSWER and tls == "implicit":
        # The port greeted us in plain text: it is a STARTTLS (or plain) port, not SMTPS.
        return NotifyFailed(f'{where}: not an implicit-TLS port; use tls = "starttls" (port 587)', permanent=True)
    return NotifyFailed(f"{where}: TLS failed: {exc.reason or exc}")


def _describe(refused: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{address} ({code} {text.decode(errors='replace')})" for address, (code, text) in refused.items())


register_notifier("email", EmailConfig, EmailNotifier)
