"""SMS through a Twilio-style HTTP API: one request, one text, per phone number.

The request is Twilio's "create a Message": ``POST {base_url}/2010-04-01/Accounts/
{AccountSid}/Messages.json``, HTTP Basic auth ``AccountSid:AuthToken``, a form body
with ``To``, ``From`` and ``Body``. Twilio answers 201 with the Message resource
(JSON, its ``sid`` identifies the text), or an error JSON ``{"code", "message",
"more_info", "status"}``. Providers with a Twilio-compatible API (SignalWire, ...)
take the same request at their own ``base_url``.

Twilio takes no idempotency key for messages: a text accepted by Twilio whose
answer was lost is sent again on the next attempt. One outbox row per number keeps
that to the number concerned.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from pydantic import AfterValidator, Field, SecretStr, field_validator

from cloud.notify.base import CaFile, payload_text, unknown_target
from cloud.notify.http import HttpAnswer, HttpUrl, failure_for, post
from cloud.notify.registry import register_notifier
from fieldlink.configkit import Duration, Schema

__all__ = ["SmsConfig", "SmsNotifier"]

log = logging.getLogger(__name__)

# E.164: "+", a country code that does not start with 0, at most 15 digits in all.
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
# Twilio's alphanumeric sender IDs: up to 11 letters, digits and spaces, at least one letter.
_SENDER_ID = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")


def _e164(number: str) -> str:
    if not _E164.match(number):
        raise ValueError(f"must be an E.164 phone number such as '+41791234567' (no spaces), got {number!r}")
    return number


def _sender(sender: str) -> str:
    if not (_E164.match(sender) or _SENDER_ID.match(sender)):
        raise ValueError(
            f"must be an E.164 phone number such as '+15017122661' or an alphanumeric sender ID "
            f"(up to 11 letters, digits, spaces), got {sender!r}"
        )
    return sender


PhoneNumber = Annotated[str, AfterValidator(_e164)]


class SmsConfig(Schema):
    kind: Literal["sms"]
    name: str = Field(min_length=1)
    base_url: HttpUrl = "https://api.twilio.com"
    account_sid: str = Field(min_length=1)
    auth_token: SecretStr  # or auth_token_file
    sender: Annotated[str, AfterValidator(_sender)] = Field(alias="from")
    to: list[PhoneNumber] = Field(min_length=1)
    timeout: Duration = 10.0
    ca_file: CaFile | None = None  # trust this CA (a provider behind a private CA, a test server)

    @field_validator("account_sid")
    @classmethod
    def _sid_is_one_path_segment(cls, sid: str) -> str:
        if any(c in sid for c in "/?#%") or any(c.isspace() for c in sid):
            raise ValueError(f"must be an account SID such as 'AC0123…', got {sid!r}")
        return sid

    @field_validator("to")
    @classmethod
    def _unique(cls, numbers: list[str]) -> list[str]:
        twice = sorted({n for n in numbers if numbers.count(n) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} more than once (it would get every text twice)")
        return numbers

    @property
    def messages_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/2010-04-01/Accounts/{quote(self.account_sid, safe='')}/Messages.json"


class SmsNotifier:
    def __init__(self, config: SmsConfig) -> None:
        self.config = config
        self.name = config.name

    def targets(self) -> list[str]:
        return list(self.config.to)

    async def send(self, payload: dict[str, Any], target: str) -> None:
        cfg = self.config
        if target not in cfg.to:
            raise unknown_target(self.name, target, self.targets())
        text = payload_text(payload, "short")
        credentials = f"{cfg.account_sid}:{cfg.auth_token.get_secret_value()}".encode()
        headers = {
            "Authorization": "Basic " + base64.b64encode(credentials).decode("ascii"),
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        body = urlencode({"To": target, "From": cfg.sender, "Body": text}).encode("ascii")
        who = f"sms {self.name!r} to {target}"
        answer = await post(cfg.messages_url, body, headers, timeout=cfg.timeout, ca_file=cfg.ca_file, who=who)
        if not 200 <= answer.status < 300:
            raise failure_for(answer, f"{who}: {_provider_error(answer)}")
        log.info(
            "sms accepted by the provider",
            extra={"notifier": self.name, "to": target, "sid": _json(answer).get("sid"), "key": payload.get("key")},
        )


def _json(answer: HttpAnswer) -> dict[str, Any]:
    try:
        data = json.loads(answer.body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _provider_error(answer: HttpAnswer) -> str:
    """Twilio's own words: ``HTTP 400, error 21211: Invalid 'To' Phone Number (more_info)``."""
    error = _json(answer)
    message, code = error.get("message"), error.get("code")
    if not message:
        return f"HTTP {answer.status}: {answer.text() or '(empty answer)'}"
    more = f" ({error['more_info']})" if error.get("more_info") else ""
    return f"HTTP {answer.status}, error {code}: {message}{more}" if code else f"HTTP {answer.status}: {message}{more}"


register_notifier("sms", SmsConfig, SmsNotifier)
