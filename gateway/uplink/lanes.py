"""The two lanes the uplink forwards from, and the limits it forwards within.

When a connection comes up, everything already in the buffer is *backlog*; what
arrives afterwards is *live*. Each lane reads the buffer on its own cursor, in id
order, and turns consecutive telemetry into batch envelopes. The uplink picks the
lane that has had less than its share of the bytes so far, so a backlog of days
drains at full speed while fresh readings still go out within moments.

Control messages (device status, command results) always travel in the live lane,
in their original order, so an old retained status never overwrites a newer one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fieldlink.wire import BatchJoiner, TopicKind, WireError, topic
from gateway.buffer import Entry

__all__ = ["Lane", "OutgoingMessage", "RateLimit", "pick_lane"]


@dataclass(slots=True)
class OutgoingMessage:
    topic: str  # without the uplink's topic prefix
    payload: bytes
    retain: bool
    entries: list[Entry]
    records: int


class Lane:
    """One cursor over the buffer, a read-ahead queue, and what it has sent."""

    def __init__(self, name: str, weight: float, read: Callable[[int, int], Awaitable[list[Entry]]]) -> None:
        self.name = name
        self.weight = weight
        self._read = read  # (after_id, limit) -> entries
        self.cursor = 0  # highest id read so far
        self.ready: deque[Entry] = deque()
        self.more = True  # the buffer may hold entries past the cursor
        self.sent_bytes = 0
        self.sent_cost = 0.0  # what the lane used of the link, in the unit of the binding limit
        self.sent_messages = 0
        self.sent_records = 0
        self.last_sent_created_ms: int | None = None

    async def refill(self, limit: int) -> bool:
        """Read ahead; returns whether anything new came."""
        entries = await self._read(self.cursor, limit)
        # Only an empty answer means "nothing more": a short one may be cut by the tail moving.
        self.more = bool(entries)
        if entries:
            self.ready.extend(entries)
            self.cursor = entries[-1].id
        return bool(entries)

    def next_message(self, joiner: BatchJoiner, max_records: int, max_bytes: int) -> OutgoingMessage:
        """The next message: one control message, one record, or a batch of consecutive records."""
        first = self.ready.popleft()
        if not first.is_record or max_records == 1 or not self.ready or not self.ready[0].is_record:
            return OutgoingMessage(first.topic, first.payload, first.retain, [first], int(first.is_record))
        try:
            bodies = [joiner.body(first.payload)]
        except WireError:
            # Stored under another site or gateway id (the config changed since): it goes out
            # alone, as it was stored, rather than block the lane.
            return OutgoingMessage(first.topic, first.payload, False, [first], 1)
        entries = [first]
        size = len(first.payload)
        while self.ready and len(entries) < max_records:
            candidate = self.ready[0]
            if not candidate.is_record or size + len(candidate.payload) > max_bytes:
                break
            try:
                bodies.append(joiner.body(candidate.payload))
            except WireError:
                break  # it goes alone, next
            entries.append(self.ready.popleft())
            size += len(candidate.payload)
        if len(entries) == 1:
            return OutgoingMessage(first.topic, first.payload, False, entries, 1)
        payload = joiner.join(bodies)
        batch_topic = topic(TopicKind.BATCH, joiner.site, joiner.gateway)
        return OutgoingMessage(batch_topic, payload, False, entries, len(entries))

    def hold(self, now_ms: int, linger_ms: int, max_records: int) -> int:
        """Milliseconds to wait for more records to batch with (0: send now).

        Only a short run of fresh records waits: anything old enough, a full batch, or a
        control message goes at once. A few milliseconds turn a stream of single-record
        messages (each with its own PUBACK) into a few batches.
        """
        if not self.ready or linger_ms <= 0:
            return 0
        first = self.ready[0]
        if not first.is_record or len(self.ready) >= max_records:
            return 0
        # Bounded by linger_ms: a wall clock stepping back must not hold the lane for the step.
        return min(linger_ms, max(0, first.created_ms + linger_ms - now_ms))

    def sent(self, message: OutgoingMessage, cost: float | None = None) -> None:
        """Count a message; ``cost`` is its share of the binding limit (default: its bytes)."""
        self.sent_bytes += len(message.payload)
        self.sent_cost += len(message.payload) if cost is None else cost
        self.sent_messages += 1
        self.sent_records += message.records
        self.last_sent_created_ms = message.entries[-1].created_ms


def pick_lane(lanes: list[Lane], held: frozenset[str] = frozenset()) -> Lane | None:
    """The lane with entries ready (and not held) that is furthest below its share of the link."""
    candidates = [lane for lane in lanes if lane.ready and lane.name not in held]
    if not candidates:
        return None
    return min(candidates, key=lambda lane: lane.sent_cost / lane.weight)


class RateLimit:
    """A token bucket allowing one second of burst; ``rate`` 0 means unlimited."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._stamp = time.monotonic()

    def wait_time(self) -> float:
        """Seconds until the next message may go (0: now)."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def spend(self, amount: float) -> None:
        # Going into debt lets a message bigger than one second's allowance through,
        # and makes the following ones wait for it.
        if self.rate > 0:
            self._tokens -= amount
