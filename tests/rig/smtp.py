"""An in-process SMTP server (aiosmtpd) that keeps what it receives, or rejects it on demand."""

from __future__ import annotations

import email
import email.policy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, cast

from aiosmtpd.controller import Controller

from tests.rig.ports import LOOPBACK, free_port


@dataclass(frozen=True)
class ReceivedMail:
    message: EmailMessage
    mail_from: str
    rcpt_tos: list[str]
    # time.monotonic() when the server answered 250 to DATA: for latency measurements (bench.alerts).
    accepted_at: float = 0.0


class SmtpSink:
    """Keeps every accepted message; `fail_with = "451 try later"` makes it refuse DATA instead."""

    def __init__(self, port: int | None = None) -> None:
        # aiosmtpd's readiness check connects to the port it was given, so port=0
        # does not work: pick a free port first.
        self.port = port if port is not None else free_port()
        self.host = LOOPBACK
        # When set, handle_DATA answers this (e.g. "451 try later", "554 rejected")
        # and drops the message, as a failing mail relay would.
        self.fail_with: str | None = None
        self.rejected = 0
        self._received: list[ReceivedMail] = []
        self._changed = threading.Condition()
        self._controller: Controller | None = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError(f"SMTP sink on port {self.port} is already running")
        # A Controller closes its event loop on stop(), so each start needs a new one.
        controller = Controller(self, hostname=self.host, port=self.port)
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Stop listening; the port and the received messages are kept for a restart."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # name fixed by aiosmtpd
        if self.fail_with is not None:
            with self._changed:
                self.rejected += 1
            return self.fail_with
        # policy.default makes the parser build an EmailMessage; the stubs only say Message.
        message = cast(EmailMessage, email.message_from_bytes(envelope.content, policy=email.policy.default))
        mail = ReceivedMail(message, envelope.mail_from, list(envelope.rcpt_tos), time.monotonic())
        with self._changed:
            self._received.append(mail)
            self._changed.notify_all()
        return "250 OK"

    @property
    def received(self) -> list[ReceivedMail]:
        """Copies of what was accepted, with the envelope sender and recipients."""
        with self._changed:
            return list(self._received)

    @property
    def messages(self) -> list[EmailMessage]:
        with self._changed:
            return [mail.message for mail in self._received]

    def wait_for(self, count: int | Callable[[list[EmailMessage]], bool], timeout: float = 10.0) -> list[EmailMessage]:
        """Block until at least `count` messages were accepted (or the predicate holds on them);
        TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout
        done = count if callable(count) else (lambda messages: len(messages) >= count)
        with self._changed:
            while not done([mail.message for mail in self._received]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    wanted = "the expected messages" if callable(count) else f"{count} messages"
                    raise TimeoutError(
                        f"SMTP sink on port {self.port}: {len(self._received)} messages, not {wanted}, "
                        f"after {timeout:.1f} s ({self.rejected} rejected by fail_with)"
                    )
                self._changed.wait(remaining)
            return [mail.message for mail in self._received]

    def __repr__(self) -> str:
        return f"SmtpSink(port={self.port}, running={self.running}, received={len(self.received)})"
