"""What every notifier promises the outbox, and what the notifiers share.

The alerting engine renders one payload per alert transition and receiver (see
:data:`PAYLOAD_KEYS` and ``docs/notifications.md``). The outbox stores one row per
(notifier, target), where the targets are what :meth:`Notifier.targets` lists, and
calls ``await notifier.send(payload, target)`` until it returns.

A notifier keeps no delivery state: the outbox owns retries, backoff and what was
already delivered. ``send`` either returns (the provider accepted the message) or
raises :class:`NotifyFailed`, whose ``permanent`` flag says whether retrying the
same request can help, and whose ``retry_after`` carries a provider's Retry-After.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import AfterValidator

__all__ = [
    "PAYLOAD_KEYS",
    "CaFile",
    "Notifier",
    "NotifyFailed",
    "certificate_problem",
    "client_tls_context",
    "payload_text",
    "unknown_target",
]

# Keys the alerting engine always writes into a payload (docs/notifications.md).
PAYLOAD_KEYS = ("key", "status", "severity", "subject", "body", "short", "alerts", "ack_hint")


class NotifyFailed(Exception):
    """Delivery failed.

    ``permanent``: sending the same request again cannot succeed (refused recipient,
    rejected credentials, malformed request) until someone changes something.
    ``retry_after``: seconds the provider asked us to wait (429/503 Retry-After), or None.
    """

    def __init__(self, reason: str, *, permanent: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"NotifyFailed({self.reason!r}, permanent={self.permanent}, retry_after={self.retry_after})"


class Notifier(Protocol):
    name: str

    def targets(self) -> list[str]:
        """One outbox row per target: a retry of one target never repeats another's delivery."""
        ...

    async def send(self, payload: dict[str, Any], target: str) -> None:
        """Deliver ``payload`` to ``target`` (one of ``targets()``), or raise NotifyFailed."""
        ...


def payload_text(payload: dict[str, Any], key: str) -> str:
    """``payload[key]`` as a string; a payload without it can never be sent, so that is permanent."""
    value = payload.get(key)
    if not isinstance(value, str):
        raise NotifyFailed(f"payload has no text {key!r} (got {type(value).__name__})", permanent=True)
    return value


def unknown_target(name: str, target: str, known: list[str]) -> NotifyFailed:
    """The row was queued for a target the config no longer lists: sending it elsewhere would be wrong."""
    return NotifyFailed(f"notifier {name!r} has no target {target!r} any more (now: {known})", permanent=True)


# --- TLS shared by the transports -----------------------------------------------------


def _loadable_ca(path: Path) -> Path:
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise ValueError(f"cannot read {path}: no such file") from None
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise ValueError(f"{path} holds no PEM CA certificate") from None
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return path


CaFile = Annotated[Path, AfterValidator(_loadable_ca)]
"""PEM CA certificates to trust instead of the system's, checked when the config is loaded."""


def client_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the server's certificate and name, against ``ca_file`` only, or the system CAs.

    Built for every send, so a renewed CA file is used without a restart.
    """
    return ssl.create_default_context(cafile=ca_file) if ca_file is not None else ssl.create_default_context()


def certificate_problem(exc: BaseException, ca_file: Path | None, where: str) -> NotifyFailed | None:
    """A NotifyFailed saying what to fix when ``exc`` is (or wraps) a failed certificate check."""
    cause: BaseException | None = exc
    for _ in range(8):  # a chain is short; the bound only guards against a cycle
        if cause is None or isinstance(cause, ssl.SSLCertVerificationError):
            break
        cause = cause.__cause__ or cause.__context__ or (cause.args[0] if _wraps_exception(cause) else None)
    if not isinstance(cause, ssl.SSLCertVerificationError):
        return None
    trust = f"ca_file {ca_file}" if ca_file is not None else "the system CA certificates"
    detail = cause.verify_message or str(cause)
    # Transient: an expired or replaced certificate is most often fixed on the server's side
    # (a renewal), and the alert must go out then; every attempt logs this reason until it is.
    return NotifyFailed(f"{where}: TLS certificate not accepted ({detail}); trusted: {trust}")


def _wraps_exception(exc: BaseException) -> bool:
    # urllib3 keeps the ssl error as the first argument of its own exceptions.
    return bool(exc.args) and isinstance(exc.args[0], BaseException) and exc.args[0] is not exc
