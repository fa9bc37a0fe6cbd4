"""Webhooks: the payload as JSON, POSTed to one URL (or a Slack/Mattermost incoming webhook).

``format = "fieldlink"`` posts the payload dict as it is (docs/notifications.md);
``format = "slack"`` posts ``{"text": subject + "\\n" + body}``, which Slack and
Mattermost incoming webhooks show as a message. Every request carries
``Idempotency-Key: <payload key>``, so a receiver can drop the repeat of a
request whose answer was lost. Any 2xx answer means delivered.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from cloud.notify.base import CaFile, payload_text, unknown_target
from cloud.notify.http import HttpUrl, failure_for, post, redacted
from cloud.notify.registry import register_notifier
from fieldlink.configkit import Duration, Schema

__all__ = ["WebhookConfig", "WebhookNotifier"]

log = logging.getLogger(__name__)

# RFC 9110 field-name characters ("token").
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers this notifier sets itself, or that would corrupt the request if overridden.
_RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding", "idempotency-key"})


class WebhookConfig(Schema):
    kind: Literal["webhook"]
    name: str = Field(min_length=1)
    url: HttpUrl  # keep a URL that holds its secret (Slack) in ${VAR}
    format: Literal["fieldlink", "slack"] = "fieldlink"
    headers: dict[str, str] = Field(default_factory=dict)  # extra request headers, sent as written
    bearer_token: SecretStr | None = None  # or bearer_token_file; sent as "Authorization: Bearer ..."
    timeout: Duration = 10.0
    ca_file: CaFile | None = None  # trust this CA (a receiver behind a private CA)

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"{name!r} is set by the notifier itself; remove it")
            if "\r" in value or "\n" in value:
                raise ValueError(f"the value of {name!r} must be one line")
        return headers

    @field_validator("bearer_token")
    @classmethod
    def _one_authorization(cls, token: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        headers = info.data.get("headers") or {}
        if token is not None and any(name.lower() == "authorization" for name in headers):
            raise ValueError("set bearer_token or an Authorization header, not both")
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("is empty")
        return token


class WebhookNotifier:
    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self.name = config.name

    def targets(self) -> list[str]:
        return [self.config.url]

    def request_body(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self.config.format == "slack":
            subject, body = payload_text(payload, "subject"), payload_text(payload, "body")
            return {"text": _slack_escape(f"{subject}\n{body}")}
        return payload

    async def send(self, payload: dict[str, Any], target: str) -> None:
        cfg = self.config
        if target != cfg.url:
            raise unknown_target(self.name, redacted(target), [redacted(cfg.url)])
        key = payload_text(payload, "key")
        body = json.dumps(self.request_body(payload), ensure_ascii=False, separators=(",", ":")).encode()
        headers = {
            **cfg.headers,
            "Content-Type": "application/json",
            "Accept": "application/json, text/plain;q=0.9, */*;q=0.1",
            # Header values are Latin-1 on the wire; the key is ASCII by construction, but never crash on it.
            "Idempotency-Key": key.encode("ascii", errors="backslashreplace").decode("ascii"),
        }
        if cfg.bearer_token is not None:
            headers["Authorization"] = f"Bearer {cfg.bearer_token.get_secret_value()}"
        who = f"webhook {self.name!r}"
        answer = await post(cfg.url, body, headers, timeout=cfg.timeout, ca_file=cfg.ca_file, who=who)
        if not 200 <= answer.status < 300:
            detail = answer.text() or "(empty answer)"
            raise failure_for(answer, f"{who}: POST {redacted(cfg.url)} answered HTTP {answer.status}: {detail}")
        log.debug("webhook delivered", extra={"notifier": self.name, "status": answer.status, "key": key})


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions (<!channel>): escape the three characters its docs name.
    # Mattermost's Markdown turns the entities back into the characters.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


register_notifier("webhook", WebhookConfig, WebhookNotifier)
