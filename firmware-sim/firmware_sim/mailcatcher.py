"""An SMTP server that accepts every mail and saves it as a ``.eml`` file.

Stands in for the mail relay of the cloud's alert notifier: a test or the demo
points the notifier at it and looks for files in the folder. Each message becomes
``<folder>/<UTC timestamp>-<counter>.eml``, names sort in arrival order, and a
file only appears complete (written aside, then renamed).

aiosmtpd runs its own event loop in a thread, so ``start``/``stop`` are plain calls
usable from sync tests and from async code alike.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import suppress
from email import policy
from email.parser import BytesHeaderParser
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from . import SimulatorError

if TYPE_CHECKING:
    from aiosmtpd.controller import Controller

__all__ = ["MailCatcher"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 1025  # the port local mail catchers usually take; 25 needs root


class _SaveToFolder:
    """aiosmtpd handler: one file per accepted message."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0  # only the controller's thread writes it

    # aiosmtpd finds the hook by this name.
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content or b""
        # The envelope is not in the headers (Bcc recipients, bounces); keep it
        # so a test can assert who a mail was really sent to.
        prefix = (
            f"X-Envelope-From: {envelope.mail_from}\r\nX-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        self.count += 1
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        path = self.folder / f"{stamp}-{self.count:06d}.eml"
        partial = path.with_suffix(".part")
        partial.write_bytes(prefix + content)
        os.replace(partial, path)
        headers = BytesHeaderParser(policy=policy.default).parsebytes(content)
        log.info(
            "mail received",
            extra={
                "from": envelope.mail_from,
                "to": ",".join(envelope.rcpt_tos),
                "subject": str(headers.get("Subject", "")),
                "file": path.name,
            },
        )
        return "250 OK"


class MailCatcher:
    """SMTP on ``host:port`` saving mail to ``folder``; pick a free port (0 does not work)."""

    def __init__(self, folder: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.folder = Path(folder)
        self.host = host
        self.port = port
        self._handler = _SaveToFolder(self.folder)
        self._controller: Controller | None = None

    @property
    def count(self) -> int:
        """Messages saved since this catcher was created."""
        return self._handler.count

    def files(self) -> list[Path]:
        """Saved messages, oldest first."""
        return sorted(self.folder.glob("*.eml"))

    def start(self) -> None:
        """Listen; returns once the server answers. Raises SimulatorError if it cannot."""
        # Imported here: aiosmtpd is an optional dependency, and `firmware-sim run`
        # must not need it.
        try:
            from aiosmtpd.controller import Controller  # noqa: PLC0415
        except ImportError as exc:
            raise SimulatorError("mailcatcher needs aiosmtpd (pip install aiosmtpd)") from exc
        self.folder.mkdir(parents=True, exist_ok=True)
        controller = Controller(self._handler, hostname=self.host, port=self.port)
        try:
            controller.start()
        except Exception as exc:
            with suppress(Exception):
                controller.stop(no_assert=True)
            raise SimulatorError(f"mailcatcher cannot listen on {self.host}:{self.port}: {exc}") from exc
        self._controller = controller
        log.info(
            "smtp server listening",
            extra={"host": self.host, "port": self.port, "folder": str(self.folder)},
        )

    def stop(self) -> None:
        if self._controller is not None:
            controller, self._controller = self._controller, None
            controller.stop()
            log.info("smtp server stopped", extra={"messages": self.count})

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
