"""The notifiers against real servers on loopback: aiosmtpd (plain, STARTTLS, SMTPS, AUTH) for
email, and an HTTP server of ours standing in for Twilio and for webhook receivers.

Each test checks what the server received, byte for byte where it matters (headers,
form fields, JSON), and how every failure is classified: transient (retry), permanent
(retrying cannot help), with the provider's Retry-After when it gave one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from cloud.config import load_cloud_config
from cloud.notify.base import NotifyFailed
from cloud.notify.email import EmailConfig, EmailNotifier, message_id
from cloud.notify.http import parse_retry_after
from cloud.notify.registry import build_notifier
from cloud.notify.sms import SmsConfig, SmsNotifier
from cloud.notify.webhook import WebhookConfig, WebhookNotifier
from fieldlink.configkit import ConfigError
from tests.rig import LOOPBACK, SmtpSink, free_port
from tests.rig.certs import Pki, make_pki
from tests.rig.http_recorder import Answer, HttpRecorder

T = TypeVar("T")

# Each send is one short conversation on loopback; a hang must fail the test, not stall it.
SEND_DEADLINE = 15.0

KEY = "high-temp/plant-a/gw-01/boiler-1/firing/1795773731000/ops-mail"
FIRING: dict[str, Any] = {
    "key": KEY,
    "status": "firing",
    "severity": "critical",
    "subject": "[FIRING critical] High boiler temperature: plant-a/gw-01/boiler-1 temperature 96.5 °C > 95 °C",
    "body": (
        "High boiler temperature is FIRING (critical)\n"
        "\n"
        "Device:    plant-a/gw-01/boiler-1\n"
        "Metric:    temperature = 96.5 °C (threshold: above 95 °C)\n"
        "Since:     2026-11-27T10:02:11Z\n"
        "\n"
        "Acknowledge: fieldlink-cloud ack high-temp/plant-a/gw-01/boiler-1\n"
    ),
    "short": "FIRING critical: High boiler temperature plant-a/gw-01/boiler-1 96.5 °C > 95 °C since 10:02:11Z",
    "alerts": [
        {
            "id": "high-temp/plant-a/gw-01/boiler-1",
            "rule": "high-temp",
            "severity": "critical",
            "state": "firing",
            "site": "plant-a",
            "gateway": "gw-01",
            "device": "boiler-1",
            "metric": "temperature",
            "value": 96.5,
            "unit": "°C",
            "threshold": 95.0,
            "since": "2026-11-27T10:02:11Z",
            "ended": None,
            "acknowledged_by": None,
        }
    ],
    "ack_hint": "fieldlink-cloud ack high-temp/plant-a/gw-01/boiler-1",
}

SMTP_USER = "alerts@plant-a.test"
SMTP_PASSWORD = "smtp-Pa55-for-this-run"  # noqa: S105 (made up for the test)
ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"
AUTH_TOKEN = "twilio-t0ken-for-this-run"  # noqa: S105
BEARER = "hook-t0ken-for-this-run"
WRONG = "not-the-Pa55word"


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(SEND_DEADLINE):
            return await coro

    return asyncio.run(bounded())


def send_fails(notifier: Any, target: str, payload: dict[str, Any] | None = None) -> NotifyFailed:
    with pytest.raises(NotifyFailed) as caught:
        run(notifier.send(payload or FIRING, target))
    return caught.value


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One throwaway CA and server certificate (localhost, 127.0.0.1) for the whole module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    return context


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(8)
        yield sock.getsockname()[1]


# --- email --------------------------------------------------------------------------------


class SecureSmtpSink(SmtpSink):
    """The rig's sink, with what a real relay adds: TLS (STARTTLS or SMTPS), AUTH, refused recipients."""

    def __init__(self, *, password: str | None = None, refuse: dict[str, str] | None = None, **smtp: Any) -> None:
        super().__init__()
        self.password = password
        self.refuse = refuse or {}  # address -> the answer to its RCPT TO
        self.smtp_parameters = smtp
        self.logins: list[tuple[str, str, bool]] = []  # (mechanism, user, accepted)

    def start(self) -> None:
        if self.password is not None:
            self.smtp_parameters["authenticator"] = self.authenticate
        # Same as SmtpSink.start, with the TLS and AUTH parameters of this relay.
        self._controller = Controller(self, hostname=self.host, port=self.port, **self.smtp_parameters)
        self._controller.start()

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        accepted = data.password.decode() == self.password
        self.logins.append((mechanism, data.login.decode(), accepted))
        # handled=False: let aiosmtpd answer 535 itself.
        return AuthResult(success=accepted, handled=False)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
def relay() -> Iterator[list[SecureSmtpSink]]:
    """Starts nothing itself; stops every sink a test started through it."""
    started: list[SecureSmtpSink] = []
    yield started
    for sink in started:
        sink.stop()


def start_sink(relay: list[SecureSmtpSink], sink: SecureSmtpSink) -> SecureSmtpSink:
    relay.append(sink)
    sink.start()
    return sink


def email_notifier(port: int, **overrides: Any) -> EmailNotifier:
    config: dict[str, Any] = {
        "kind": "email",
        "name": "ops-mail",
        "host": LOOPBACK,
        "port": port,
        "from": "fieldlink <alerts@plant-a.test>",
        "to": ["ops@plant-a.test", "Night Shift <oncall@plant-a.test>"],
        "timeout": "3s",
        **overrides,
    }
    return EmailNotifier(EmailConfig.model_validate(config))


def test_email_plain_delivers_one_mail_to_every_recipient_with_stable_headers(smtp_sink: SmtpSink) -> None:
    notifier = email_notifier(smtp_sink.port)
    assert notifier.targets() == ["mail"]

    run(notifier.send(FIRING, "mail"))
    run(notifier.send(FIRING, "mail"))  # a retry after a lost answer: the same mail again
    other = {**FIRING, "key": KEY.replace("firing/1795773731000", "resolved/1795774491000")}
    run(notifier.send(other, "mail"))

    first, again, resolved = smtp_sink.wait_for(3)
    mail = smtp_sink.received[0]
    assert mail.mail_from == "alerts@plant-a.test"
    assert mail.rcpt_tos == ["ops@plant-a.test", "oncall@plant-a.test"]
    assert first["From"] == "fieldlink <alerts@plant-a.test>"
    assert first["To"] == "ops@plant-a.test, Night Shift <oncall@plant-a.test>"
    assert first["Subject"] == FIRING["subject"]  # non-ASCII (°C) survives the RFC 2047 encoding
    assert first["Date"] is not None
    assert first["X-Fieldlink-Alert-Key"] == KEY
    assert first.get_content().replace("\r\n", "\n") == FIRING["body"]  # SMTP lines end in CRLF
    # <32 hex digits of sha256(key + target)@fieldlink>, the same on every attempt.
    assert first["Message-ID"] == message_id(KEY, "mail")
    assert first["Message-ID"].startswith("<")
    assert first["Message-ID"].endswith("@fieldlink>")
    assert len(first["Message-ID"].removeprefix("<").split("@")[0]) == 32
    assert again["Message-ID"] == first["Message-ID"]
    assert resolved["Message-ID"] != first["Message-ID"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_email_starttls_with_a_private_ca_and_login(relay: list[SecureSmtpSink], pki: Pki, mechanism: str) -> None:
    # The relay insists on STARTTLS before MAIL and AUTH, and offers one mechanism.
    other = "LOGIN" if mechanism == "PLAIN" else "PLAIN"
    sink = start_sink(
        relay,
        SecureSmtpSink(
            password=SMTP_PASSWORD,
            tls_context=server_context(pki),
            require_starttls=True,
            auth_required=True,
            auth_exclude_mechanism=[other],
        ),
    )
    notifier = email_notifier(
        sink.port, tls="starttls", ca_file=str(pki.ca), username=SMTP_USER, password=SMTP_PASSWORD
    )
    run(notifier.send(FIRING, "mail"))
    (mail,) = sink.wait_for(1)
    assert mail["Subject"] == FIRING["subject"]
    assert sink.logins == [(mechanism, SMTP_USER, True)]


def test_email_wrong_password_is_permanent(relay: list[SecureSmtpSink], pki: Pki) -> None:
    sink = start_sink(
        relay, SecureSmtpSink(password=SMTP_PASSWORD, tls_context=server_context(pki), require_starttls=True)
    )
    notifier = email_notifier(sink.port, tls="starttls", ca_file=str(pki.ca), username=SMTP_USER, password=WRONG)
    failure = send_fails(notifier, "mail")
    assert failure.permanent
    assert "535" in failure.reason
    assert WRONG not in failure.reason  # never the password
    assert sink.logins
    assert not any(accepted for _, _, accepted in sink.logins)
    assert sink.received == []


def test_email_implicit_tls_smtps(relay: list[SecureSmtpSink], pki: Pki) -> None:
    # SMTPS: TLS from the first byte (aiosmtpd's ssl_context). AUTH inside it needs no STARTTLS.
    sink = start_sink(
        relay, SecureSmtpSink(password=SMTP_PASSWORD, ssl_context=server_context(pki), auth_require_tls=False)
    )
    notifier = email_notifier(
        sink.port, tls="implicit", ca_file=str(pki.ca), username=SMTP_USER, password=SMTP_PASSWORD
    )
    run(notifier.send(FIRING, "mail"))
    (mail,) = sink.wait_for(1)
    assert mail["Message-ID"] == message_id(KEY, "mail")
    assert sink.logins == [("PLAIN", SMTP_USER, True)]


def test_email_untrusted_certificate_is_retried_and_says_what_to_fix(relay: list[SecureSmtpSink], pki: Pki) -> None:
    sink = start_sink(relay, SecureSmtpSink(tls_context=server_context(pki), require_starttls=True))
    failure = send_fails(email_notifier(sink.port, tls="starttls", ca_file=str(pki.wrong_ca)), "mail")
    # Transient: a certificate is most often fixed on the server's side, and the alert must go out then.
    assert not failure.permanent
    assert "certificate not accepted" in failure.reason
    assert str(pki.wrong_ca) in failure.reason
    # Without ca_file the system CAs do not know the test CA either.
    assert "the system CA certificates" in send_fails(email_notifier(sink.port, tls="starttls"), "mail").reason
    assert sink.received == []


def test_email_implicit_tls_against_a_starttls_port_is_permanent(relay: list[SecureSmtpSink], pki: Pki) -> None:
    sink = start_sink(relay, SecureSmtpSink(tls_context=server_context(pki)))
    failure = send_fails(email_notifier(sink.port, tls="implicit", ca_file=str(pki.ca)), "mail")
    assert failure.permanent, failure
    assert 'tls = "starttls"' in failure.reason


def test_email_plain_client_to_a_starttls_only_relay_is_permanent(relay: list[SecureSmtpSink], pki: Pki) -> None:
    sink = start_sink(relay, SecureSmtpSink(tls_context=server_context(pki), require_starttls=True))
    failure = send_fails(email_notifier(sink.port), "mail")
    assert failure.permanent
    assert "530" in failure.reason


def test_email_relay_down_or_silent_is_transient(smtp_sink: SmtpSink, silent_port: int) -> None:
    smtp_sink.stop()
    down = send_fails(email_notifier(smtp_sink.port), "mail")
    assert not down.permanent
    assert "unreachable" in down.reason
    silent = send_fails(email_notifier(silent_port, timeout="300ms"), "mail")
    assert not silent.permanent
    assert "no answer within 0.3 s" in silent.reason


@pytest.mark.parametrize(("answer", "permanent"), [("451 4.3.0 try later", False), ("554 5.6.0 rejected", True)])
def test_email_data_refusal_is_classified_by_its_code(smtp_sink: SmtpSink, answer: str, permanent: bool) -> None:
    smtp_sink.fail_with = answer
    failure = send_fails(email_notifier(smtp_sink.port), "mail")
    assert failure.permanent is permanent
    assert answer.split(maxsplit=1)[0] in failure.reason


def test_email_some_recipients_refused_delivers_to_the_others_and_warns(
    relay: list[SecureSmtpSink], caplog: pytest.LogCaptureFixture
) -> None:
    sink = start_sink(relay, SecureSmtpSink(refuse={"oncall@plant-a.test": "550 5.1.1 no such user"}))
    with caplog.at_level(logging.WARNING, logger="cloud.notify.email"):
        run(email_notifier(sink.port).send(FIRING, "mail"))
    sink.wait_for(1)
    assert sink.received[0].rcpt_tos == ["ops@plant-a.test"]
    (warning,) = [r for r in caplog.records if r.name == "cloud.notify.email"]
    assert "refused some recipients" in warning.getMessage()
    assert "oncall@plant-a.test (550 5.1.1 no such user)" in warning.__dict__["refused"]


@pytest.mark.parametrize(("answer", "permanent"), [("550 5.1.1 no such user", True), ("450 4.2.1 busy", False)])
def test_email_every_recipient_refused_names_them(relay: list[SecureSmtpSink], answer: str, permanent: bool) -> None:
    refuse = {"ops@plant-a.test": answer, "oncall@plant-a.test": answer}
    sink = start_sink(relay, SecureSmtpSink(refuse=refuse))
    failure = send_fails(email_notifier(sink.port), "mail")
    assert failure.permanent is permanent
    assert "ops@plant-a.test" in failure.reason
    assert "oncall@plant-a.test" in failure.reason
    assert sink.received == []


def test_email_payload_without_body_or_unknown_target_is_permanent(smtp_sink: SmtpSink) -> None:
    notifier = email_notifier(smtp_sink.port)
    assert send_fails(notifier, "mail", {k: v for k, v in FIRING.items() if k != "body"}).permanent
    assert send_fails(notifier, "sms").permanent
    assert smtp_sink.received == []


# --- HTTP: a provider / receiver we control -------------------------------------------------


@pytest.fixture
def http_server() -> Iterator[HttpRecorder]:
    with HttpRecorder() as server:
        yield server


def twilio_error(status: int, code: int, message: str) -> Answer:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return Answer(status, json.dumps(body).encode(), {"Content-Type": "application/json"})


# --- SMS (Twilio) ---------------------------------------------------------------------------


def sms_notifier(base_url: str, **overrides: Any) -> SmsNotifier:
    config: dict[str, Any] = {
        "kind": "sms",
        "name": "ops-sms",
        "base_url": base_url,
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "from": "+15017122661",
        "to": ["+41791234567", "+15558675310"],
        "timeout": "3s",
        **overrides,
    }
    return SmsNotifier(SmsConfig.model_validate(config))


def test_sms_sends_twilios_create_message_request_once_per_number(
    http_server: HttpRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    created = {"sid": "SM1f0e8ae6ade43cb3c0ce4525424e404f", "status": "queued", "to": "+41791234567"}
    http_server.default = Answer(201, json.dumps(created).encode(), {"Content-Type": "application/json"})
    notifier = sms_notifier(http_server.url)
    assert notifier.targets() == ["+41791234567", "+15558675310"]

    with caplog.at_level(logging.INFO, logger="cloud.notify.sms"):
        for number in notifier.targets():
            run(notifier.send(FIRING, number))

    assert [r.method for r in http_server.requests] == ["POST", "POST"]
    for request, number in zip(http_server.requests, notifier.targets(), strict=True):
        assert request.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
        expected_auth = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
        assert request.headers["Authorization"] == f"Basic {expected_auth}"
        assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
        form = parse_qs(request.body.decode("ascii"), strict_parsing=True)
        assert form == {"To": [number], "From": ["+15017122661"], "Body": [FIRING["short"]]}
        assert "Idempotency-Key" not in request.headers  # Twilio takes none
    sids = [r.__dict__.get("sid") for r in caplog.records if r.name == "cloud.notify.sms"]
    assert sids == [created["sid"], created["sid"]]


def test_sms_unknown_target_is_permanent_and_sends_nothing(http_server: HttpRecorder) -> None:
    failure = send_fails(sms_notifier(http_server.url), "+33612345678")
    assert failure.permanent
    assert http_server.requests == []


def test_sms_429_with_retry_after_is_transient(http_server: HttpRecorder) -> None:
    too_many = twilio_error(429, 20429, "Too Many Requests")
    too_many.headers["Retry-After"] = "7"
    in_a_minute = datetime.now(UTC) + timedelta(seconds=60)
    http_date = twilio_error(429, 20429, "Too Many Requests")
    http_date.headers["Retry-After"] = format_datetime(in_a_minute, usegmt=True)
    http_server.answers = [too_many, http_date]
    notifier = sms_notifier(http_server.url)

    failure = send_fails(notifier, "+41791234567")
    assert not failure.permanent
    assert failure.retry_after == 7.0
    assert "20429" in failure.reason
    assert "Too Many Requests" in failure.reason
    failure = send_fails(notifier, "+41791234567")
    assert failure.retry_after is not None
    assert 50 < failure.retry_after <= 60


def test_sms_server_error_is_transient(http_server: HttpRecorder) -> None:
    http_server.answers = [Answer(500, b"<html>oops</html>"), Answer(503)]
    notifier = sms_notifier(http_server.url)
    failure = send_fails(notifier, "+41791234567")
    assert not failure.permanent
    assert failure.retry_after is None
    assert "HTTP 500" in failure.reason
    assert "oops" in failure.reason
    assert not send_fails(notifier, "+41791234567").permanent


def test_sms_rejected_request_is_permanent_with_twilios_message(http_server: HttpRecorder) -> None:
    message = "The 'To' number +41791234567 is not a valid phone number."
    http_server.answers = [twilio_error(400, 21211, message), twilio_error(401, 20003, "Authenticate")]
    notifier = sms_notifier(http_server.url)
    failure = send_fails(notifier, "+41791234567")
    assert failure.permanent
    assert message in failure.reason
    assert "error 21211" in failure.reason
    assert "https://www.twilio.com/docs/errors/21211" in failure.reason
    wrong_token = send_fails(notifier, "+41791234567")
    assert wrong_token.permanent
    assert "Authenticate" in wrong_token.reason
    assert AUTH_TOKEN not in failure.reason + wrong_token.reason


def test_sms_provider_down_or_silent_is_transient(silent_port: int) -> None:
    down = send_fails(sms_notifier(f"http://{LOOPBACK}:{free_port()}"), "+41791234567")
    assert not down.permanent
    assert "unreachable" in down.reason
    silent = send_fails(sms_notifier(f"http://{LOOPBACK}:{silent_port}", timeout="300ms"), "+41791234567")
    assert not silent.permanent
    assert "no answer within 0.3 s" in silent.reason


def test_sms_over_https_trusts_ca_file_only(pki: Pki) -> None:
    with HttpRecorder(tls=server_context(pki)) as server:
        server.default = Answer(201, b'{"sid": "SM0"}', {"Content-Type": "application/json"})
        run(sms_notifier(server.url, ca_file=str(pki.ca)).send(FIRING, "+41791234567"))
        assert len(server.requests) == 1
        failure = send_fails(sms_notifier(server.url, ca_file=str(pki.wrong_ca)), "+41791234567")
        assert not failure.permanent
        assert "certificate not accepted" in failure.reason
        assert len(server.requests) == 1


# --- webhook --------------------------------------------------------------------------------


def webhook_notifier(url: str, **overrides: Any) -> WebhookNotifier:
    config: dict[str, Any] = {"kind": "webhook", "name": "ops-hook", "url": url, "timeout": "3s", **overrides}
    return WebhookNotifier(WebhookConfig.model_validate(config))


def test_webhook_posts_the_payload_as_json_with_idempotency_key_and_bearer(http_server: HttpRecorder) -> None:
    url = f"{http_server.url}/hooks/fieldlink?tenant=plant-a"
    notifier = webhook_notifier(url, bearer_token=BEARER, headers={"X-Tenant": "plant-a"})
    assert notifier.targets() == [url]
    run(notifier.send(FIRING, url))

    (request,) = http_server.requests
    assert (request.method, request.path) == ("POST", "/hooks/fieldlink?tenant=plant-a")
    assert json.loads(request.body) == FIRING
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == KEY
    assert request.headers["Authorization"] == f"Bearer {BEARER}"
    assert request.headers["X-Tenant"] == "plant-a"


def test_webhook_slack_format_is_one_text(http_server: HttpRecorder) -> None:
    url = f"{http_server.url}/services/T000/B000/XXXX"
    payload = {**FIRING, "body": FIRING["body"] + "See <!channel> & co\n"}
    run(webhook_notifier(url, format="slack").send(payload, url))
    (request,) = http_server.requests
    # Slack reads <...> as links and mentions: &, < and > are escaped (96.5 °C &gt; 95 °C).
    text = (FIRING["subject"] + "\n" + FIRING["body"]).replace(">", "&gt;") + "See &lt;!channel&gt; &amp; co\n"
    assert json.loads(request.body) == {"text": text}
    assert request.headers["Idempotency-Key"] == KEY
    assert "Authorization" not in request.headers


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_webhook_any_2xx_is_delivered(http_server: HttpRecorder, status: int) -> None:
    http_server.default = Answer(status)
    run(webhook_notifier(http_server.url).send(FIRING, http_server.url))
    assert len(http_server.requests) == 1


@pytest.mark.parametrize(
    ("status", "permanent"),
    [
        (400, True),
        (401, True),
        (403, True),
        (404, True),
        (410, True),
        (422, True),
        (301, True),
        (408, False),
        (429, False),
        (500, False),
        (502, False),
        (503, False),
    ],
)
def test_webhook_failures_are_classified_by_status(http_server: HttpRecorder, status: int, permanent: bool) -> None:
    secret_path = "/services/T000/B000/s3cr3t"  # noqa: S105 (what a Slack URL looks like)
    url = f"{http_server.url}{secret_path}"
    http_server.default = Answer(status, b"channel_not_found" if status == 404 else b"", {"Retry-After": "3"})
    failure = send_fails(webhook_notifier(url), url)
    assert failure.permanent is permanent
    assert f"HTTP {status}" in failure.reason
    assert "s3cr3t" not in failure.reason  # the URL's path is the secret of a Slack webhook
    assert failure.retry_after == (3.0 if status in {429, 503} else None)
    if status == 404:
        assert "channel_not_found" in failure.reason


def test_webhook_receiver_down_or_silent_is_transient(silent_port: int) -> None:
    down_url = f"http://{LOOPBACK}:{free_port()}/hook"
    assert not send_fails(webhook_notifier(down_url), down_url).permanent
    silent_url = f"http://{LOOPBACK}:{silent_port}/hook"
    silent = send_fails(webhook_notifier(silent_url, timeout="300ms"), silent_url)
    assert not silent.permanent
    assert "no answer" in silent.reason


def test_retry_after_takes_seconds_and_http_dates() -> None:
    now = datetime(2026, 11, 27, 10, 2, 11, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("Fri, 27 Nov 2026 10:03:11 GMT", now) == 60.0
    assert parse_retry_after("Fri, 27 Nov 2026 10:00:00 GMT", now) == 0.0  # in the past: now
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


# --- config: through the cloud's loader, with file and dotted key ---------------------------


def load_problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "cloud.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_cloud_config(path)
    assert all(line.startswith(f"{path}: ") for line in caught.value.lines())
    return [line.removeprefix(f"{path}: ") for line in caught.value.lines()]


def test_config_errors_name_the_dotted_key(tmp_path: Path) -> None:
    problems = load_problems(
        tmp_path,
        """
[[notifiers]]
kind = "sms"
name = "pager"
account_sid = "AC1"
auth_token = "x"
from = "+15017122661"
to = ["+41791234567", "079 123 45 67"]

[[notifiers]]
kind = "webhook"
name = "hook"
url = "hooks.example.com/fieldlink"

[[notifiers]]
kind = "email"
name = "mail"
host = "smtp.example.com"
tls = "ssl"
from = "alerts@example.com"
to = ["ops@example.com"]

[[notifiers]]
kind = "email"
name = "old"
host = "smtp.example.com"
starttls = true
from = "alerts@example.com"
to = ["ops"]
""",
    )
    assert problems == [
        "notifiers[0].to[1]: must be an E.164 phone number such as '+41791234567' (no spaces), got '079 123 45 67'",
        "notifiers[1].url: must start with https:// (or http://) and a host",
        "notifiers[2].tls: must be one of 'none', 'starttls' or 'implicit', got 'ssl'",
        "notifiers[3].to[0]: must be an email address such as 'ops@example.com', got 'ops'",
        'notifiers[3].starttls: replaced by tls = "starttls" (or "implicit" for SMTPS on 465, "none")',
    ]


def test_config_refuses_a_password_in_clear_and_conflicting_auth(tmp_path: Path) -> None:
    problems = load_problems(
        tmp_path,
        """
[[notifiers]]
kind = "email"
name = "mail"
host = "smtp.example.com"
username = "alerts"
password = "pw"
from = "alerts@example.com"
to = ["ops@example.com"]

[[notifiers]]
kind = "webhook"
name = "hook"
url = "https://hooks.example.com/x"
headers = { Authorization = "Basic eA==" }
bearer_token = "t"

[[notifiers]]
kind = "webhook"
name = "hook2"
url = "https://hooks.example.com/y"
headers = { "Content-Type" = "text/plain" }
""",
    )
    assert problems == [
        'notifiers[0].password: would cross the network in clear: set tls = "starttls" or "implicit"',
        "notifiers[1].bearer_token: set bearer_token or an Authorization header, not both",
        "notifiers[2].headers: 'Content-Type' is set by the notifier itself; remove it",
    ]


def test_config_secrets_from_files_reach_the_servers(tmp_path: Path, http_server: HttpRecorder) -> None:
    secrets = tmp_path / "credentials"
    secrets.mkdir()
    for name, value in {"smtp": SMTP_PASSWORD, "twilio": AUTH_TOKEN, "hook": BEARER}.items():
        (secrets / name).write_text(value + "\n")
    path = tmp_path / "cloud.toml"
    path.write_text(f"""
[[notifiers]]
kind = "email"
name = "mail"
host = "smtp.example.com"
tls = "implicit"
username = "{SMTP_USER}"
password_file = "{secrets / "smtp"}"
from = "alerts@example.com"
to = ["ops@example.com"]

[[notifiers]]
kind = "sms"
name = "pager"
base_url = "{http_server.url}"
account_sid = "{ACCOUNT_SID}"
auth_token_file = "{secrets / "twilio"}"
from = "+15017122661"
to = ["+41791234567"]

[[notifiers]]
kind = "webhook"
name = "hook"
url = "{http_server.url}/hook"
bearer_token_file = "{secrets / "hook"}"
""")
    config = load_cloud_config(path)
    mail, pager, hook = (build_notifier(n) for n in config.notifiers)
    assert isinstance(mail, EmailNotifier)
    assert mail.config.smtp_port == 465  # the default port of implicit TLS
    assert mail.config.password is not None
    assert mail.config.password.get_secret_value() == SMTP_PASSWORD

    http_server.default = Answer(201, b'{"sid": "SM1"}')
    run(pager.send(FIRING, "+41791234567"))
    run(hook.send(FIRING, f"{http_server.url}/hook"))
    sms, webhook = http_server.requests
    assert sms.headers["Authorization"] == "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    assert webhook.headers["Authorization"] == f"Bearer {BEARER}"
    assert AUTH_TOKEN not in repr(config)
    assert BEARER not in repr(config)


@pytest.mark.parametrize(("tls", "port"), [("none", 25), ("starttls", 587), ("implicit", 465)])
def test_email_default_port_follows_tls(tls: str, port: int) -> None:
    config = EmailConfig.model_validate(
        {"kind": "email", "name": "m", "host": "h", "tls": tls, "from": "a@b.c", "to": ["d@e.f"]}
    )
    assert config.smtp_port == port


def test_every_toml_example_of_the_notifications_doc_loads(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "notifications.md").read_text()
    blocks = [part.split("```", 1)[0] for part in doc.split("```toml\n")[1:]]
    assert len(blocks) >= 5
    for name, value in {
        "SMTP_PASSWORD": SMTP_PASSWORD,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "OPS_WEBHOOK_TOKEN": BEARER,
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/XXXX",
    }.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "cloud.toml"
    # The examples name a CA file of a plant; this run has its own.
    path.write_text("\n".join(blocks).replace("/etc/fieldlink/plant-ca.pem", str(pki.ca)))
    config = load_cloud_config(path)
    assert sorted(n.kind for n in config.notifiers) == ["email", "email", "sms", "webhook", "webhook"]
