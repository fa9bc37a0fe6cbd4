"""One HTTP POST for the HTTP notifiers (SMS provider, webhook): urllib3 on a worker thread.

urllib3 is already installed (influxdb-client needs it) and does what we need:
certificate checks, timeouts, no automatic retries or redirects (the outbox owns
retries; a redirect means the configured URL is wrong). A notification is a few
requests an hour, so each send opens its own connection: no pool to go stale
between two alerts, and a renewed ``ca_file`` is read on the next send.

Every way a request can fail becomes one :class:`NotifyFailed`, classified once,
here, for both notifiers (docs/notifications.md has the table).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import urllib3
from pydantic import AfterValidator
from urllib3.exceptions import HTTPError, NewConnectionError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from cloud.notify.base import NotifyFailed, certificate_problem, client_tls_context

__all__ = ["HttpAnswer", "HttpUrl", "failure_for", "parse_retry_after", "post", "redacted"]

USER_AGENT = "fieldlink-cloud"

# 4xx answers that say "not now" rather than "never": request timeout, conflict (an
# idempotency key still in flight), too early, too many requests.
_TRANSIENT_4XX = frozenset({408, 409, 425, 429})
_RETRY_AFTER_STATUSES = frozenset({429, 503})
# A provider's error body can be a whole HTML page; the reason is a log line.
_MAX_BODY_IN_REASON = 300


def _http_url(url: str) -> str:
    # The messages never repeat the URL: its path or query may be the secret (Slack).
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError("must start with https:// (or http://) and a host")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        parts.port  # noqa: B018 (urlsplit checks the port only when asked)
    except ValueError:
        raise ValueError(f"has an invalid port (host {parts.hostname})") from None
    if any(c.isspace() for c in url):
        raise ValueError("must not contain spaces (encode them as %20)")
    return url


HttpUrl = Annotated[str, AfterValidator(_http_url)]
"""An ``https://`` (or ``http://``) URL with a host."""


def redacted(url: str) -> str:
    """``scheme://host[:port]/…``: webhook URLs often carry their secret in the path (Slack)."""
    parts = urlsplit(url)
    if not parts.netloc:
        return "(not a URL)"
    host = parts.netloc.rpartition("@")[2]  # never show user:password@
    return f"{parts.scheme}://{host}/…" if parts.path.strip("/") or parts.query else f"{parts.scheme}://{host}"


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def text(self, limit: int = _MAX_BODY_IN_REASON) -> str:
        text = self.body.decode("utf-8", errors="replace").strip()
        return text if len(text) <= limit else text[:limit] + "…"


async def post(
    url: str, body: bytes, headers: dict[str, str], *, timeout: float, ca_file: Path | None, who: str
) -> HttpAnswer:
    """POST ``body``; the answer whatever its status, or NotifyFailed if none came (``who`` names the sender)."""
    return await asyncio.to_thread(_post, url, body, headers, timeout=timeout, ca_file=ca_file, who=who)


def _post(
    url: str, body: bytes, headers: dict[str, str], *, timeout: float, ca_file: Path | None, who: str
) -> HttpAnswer:
    where = f"{who}: POST {redacted(url)}"
    try:
        context = client_tls_context(ca_file)
    except OSError as exc:  # readable at load time, not any more: retried until it is put back
        raise NotifyFailed(f"{where}: cannot load ca_file {ca_file}: {exc}") from None
    pool = urllib3.PoolManager(ssl_context=context, retries=False, timeout=urllib3.Timeout(total=timeout))
    try:
        response = pool.request(
            "POST", url, body=body, headers={"User-Agent": USER_AGENT, **headers}, redirect=False, preload_content=True
        )
    except SSLError as exc:
        raise certificate_problem(exc, ca_file, where) or NotifyFailed(f"{where}: TLS failed: {exc}") from None
    except NewConnectionError as exc:  # (a subclass of urllib3's TimeoutError, for history's sake)
        raise NotifyFailed(f"{where}: unreachable: {_short(exc)}") from None
    except (TimeoutError, Urllib3Timeout):
        raise NotifyFailed(f"{where}: no answer within {timeout:g} s") from None
    except (HTTPError, OSError) as exc:
        # Refused, reset, name not resolved: the server may be back later.
        raise NotifyFailed(f"{where}: unreachable: {_short(exc)}") from None
    finally:
        pool.clear()
    return HttpAnswer(response.status, {k.lower(): v for k, v in response.headers.items()}, response.data or b"")


def failure_for(answer: HttpAnswer, reason: str) -> NotifyFailed:
    """Classify a non-2xx answer: 408/409/425/429 and 5xx are retried, other statuses are permanent."""
    status = answer.status
    transient = status >= 500 or status in _TRANSIENT_4XX
    retry_after = parse_retry_after(answer.headers.get("retry-after")) if status in _RETRY_AFTER_STATUSES else None
    return NotifyFailed(reason, permanent=not transient, retry_after=retry_after)


def parse_retry_after(header: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if header is None or not header.strip():
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates parse naive; HTTP-dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _short(exc: BaseException) -> str:
    # urllib3's NewConnectionError repeats the connection object; the cause says it plainly.
    text = str(exc)
    if "Failed to establish a new connection:" in text:
        text = text.split("Failed to establish a new connection:", 1)[1].strip()
    return text
