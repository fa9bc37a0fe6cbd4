"""Report-by-exception: which polled values of a tag are worth sending.

``report = "poll"`` sends every poll. ``report = "change"`` sends a value when it
differs from the last one *sent* by more than the deadband (absolute, or percent of
the last sent value), so a slow drift is reported once it adds up. Either way a
quality change is always sent, ``min_interval`` holds back reports that come too
soon (the next poll after it sends the latest value if it still differs), and
``max_interval`` sends the value even unchanged (a heartbeat).
"""

from __future__ import annotations

from fieldlink.wire import Value
from gateway.sources.modbus.config import RegisterConfig

__all__ = ["ReportFilter"]


class ReportFilter:
    def __init__(self, tag: RegisterConfig) -> None:
        self.tag = tag
        self._last: Value | None = None
        self._last_at = 0.0

    @staticmethod
    def needed(tag: RegisterConfig) -> bool:
        """Whether the tag may hold a value back; one that reports every poll needs no filter."""
        return tag.report != "poll" or tag.min_interval > 0

    def reset(self) -> None:
        """Send the next value whatever it is (after an outage, or a write)."""
        self._last = None

    def offer(self, value: Value, now: float) -> bool:
        """Whether to send ``value`` polled at ``now`` (monotonic seconds); remembers it if so."""
        if self._should_send(value, now):
            self._last, self._last_at = value, now
            return True
        return False

    def _should_send(self, value: Value, now: float) -> bool:
        tag, last = self.tag, self._last
        if last is None or value.quality != last.quality:
            return True
        since = now - self._last_at
        if tag.max_interval is not None and since >= tag.max_interval:
            return True
        if since < tag.min_interval:
            return False
        if tag.report == "poll":
            return True
        return self._changed(last, value)

    def _changed(self, last: Value, value: Value) -> bool:
        if value.value == last.value:
            return False
        tag = self.tag
        if not isinstance(value.value, int | float) or not isinstance(last.value, int | float):
            return True
        if isinstance(value.value, bool):
            return True
        delta = abs(value.value - last.value)
        if tag.deadband is not None and delta <= tag.deadband:
            return False
        # Both set: the value must move past both.
        return tag.deadband_percent is None or delta > abs(last.value) * tag.deadband_percent / 100
