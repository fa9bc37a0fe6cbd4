"""Email through an SMTP relay (smtplib on a worker thread), with STARTTLS and login."""

from __future__ import annotations

import asyncio
import email.policy
import smtplib
import ssl
import time
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Literal

from pydantic import Field, SecretStr

from cloud.notify.base import NotifyFailed
from cloud.notify.registry import register_notifier
from cloud.rules import AlertEvent
from fieldlink.configkit import Duration, Port, Schema

__all__ = ["EmailConfig", "EmailNotifier"]


class EmailConfig(Schema):
    kind: Literal["email"]
    name: str = Field(min_length=1)
    host: str
    port: Port = 25
    starttls: bool = False
    username: str | None = None
    password: SecretStr | None = None
    sender: str = Field(alias="from")
    to: list[str] = Field(min_length=1)
    timeout: Duration = 10.0


# Subjects name device, value and threshold, so they run past 78 characters; the default
# policy then folds them oddly (a leading space after unfolding). RFC 5322 allows 998.
_POLICY = email.policy.default.clone(max_line_length=998)


def _iso(ts_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ms / 1000)) + f".{ts_ms % 1000:03d}Z"


class EmailNotifier:
    def __init__(self, config: EmailConfig) -> None:
        self.config = config
        self.name = config.name

    def render(self, event: AlertEvent) -> dict[str, Any]:
        rule = event.rule
        unit = f" {event.unit}" if event.unit else ""
        where = f"{event.site}/{event.gateway}/{event.device}"
        if event.state == "firing":
            subject = (
                f"[FIRING {rule.severity.value}] {rule.name}: {event.device} {rule.metric} = "
                f"{event.value:g}{unit} {event.comparison}"
            )
        else:
            subject = f"[RESOLVED] {rule.name}: {event.device} {rule.metric} = {event.value:g}{unit} {event.comparison}"
        body = "\n".join(
            [
                f"Rule:      {rule.name} ({rule.severity.value})",
                f"State:     {event.state}",
                f"Device:    {event.device}",
                f"Where:     {where}",
                f"Metric:    {rule.metric}",
                f"Value:     {event.value:g}{unit}",
                f"Threshold: {rule.direction} {rule.threshold:g}{unit} (clears past {rule.clear_level:g}{unit})",
                f"Time:      {_iso(event.ts)}",
                "",
                "-- fieldlink",
            ]
        )
        return {"subject": subject, "body": body, "message_id": f"<{event.key}@fieldlink>"}

    async def send(self, payload: dict[str, Any]) -> None:
        message = EmailMessage(policy=_POLICY)
        message["From"] = self.config.sender
        message["To"] = ", ".join(self.config.to)
        message["Subject"] = payload["subject"]
        message["Date"] = formatdate(usegmt=True)
        # Stable per alert transition: a retried send after a lost answer is recognisable as the same mail.
        message["Message-ID"] = payload["message_id"]
        message.set_content(payload["body"])
        await asyncio.get_running_loop().run_in_executor(None, self._deliver, message)

    def _deliver(self, message: EmailMessage) -> None:
        cfg = self.config
        try:
            with smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout) as smtp:
                if cfg.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if cfg.username:
                    smtp.login(cfg.username, cfg.password.get_secret_value() if cfg.password else "")
                smtp.send_message(message)
        except smtplib.SMTPResponseException as exc:
            # 5xx is a permanent refusal (bad recipient, rejected content); 4xx means try later.
            raise NotifyFailed(f"SMTP {exc.smtp_code}: {exc.smtp_error!r}", permanent=exc.smtp_code >= 500) from None
        except smtplib.SMTPRecipientsRefused as exc:
            raise NotifyFailed(f"recipients refused: {list(exc.recipients)}", permanent=True) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise NotifyFailed(f"SMTP {cfg.host}:{cfg.port} unreachable: {exc}") from None


register_notifier("email", EmailConfig, EmailNotifier)
