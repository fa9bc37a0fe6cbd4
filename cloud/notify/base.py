"""What every notifier promises the outbox.

``render`` turns an alert event into a JSON-able payload, which the outbox stores
durably before anything is sent; ``send`` delivers one stored payload or raises
:class:`NotifyFailed`. A notifier keeps no state between calls: the outbox owns
retries, backoff and what was already delivered.
"""

from __future__ import annotations

from typing import Any, Protocol

from cloud.rules import AlertEvent

__all__ = ["Notifier", "NotifyFailed"]


class NotifyFailed(Exception):
    """Delivery failed; ``permanent`` failures (rejected recipient) are not retried."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent


class Notifier(Protocol):
    name: str

    def render(self, event: AlertEvent) -> dict[str, Any]: ...

    async def send(self, payload: dict[str, Any]) -> None: ...
