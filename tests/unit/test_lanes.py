"""The uplink's lanes: batching the buffer into envelopes, sharing the link by weight, rate limits."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import pytest

from fieldlink.wire import BatchJoiner, Encoding, Record, TopicKind, Value, decode, encode_record, topic
from gateway.buffer import Entry, Priority
from gateway.uplink import lanes
from gateway.uplink.lanes import Lane, OutgoingMessage, RateLimit, pick_lane

SITE, GATEWAY = "plant-1", "gw-1"
BATCH_TOPIC = topic(TopicKind.BATCH, SITE, GATEWAY)

_ids = itertools.count(1)


def record_entry(device: str = "a", seq: int = 1, encoding: Encoding = Encoding.MSGPACK, extra: int = 0) -> Entry:
    """A buffered telemetry record; ``extra`` pads its values to make it bigger."""
    values = {"t": Value.of(20.0 + seq, "degC")}
    if extra:
        values["note"] = Value.of("x" * extra)
    record = Record(SITE, GATEWAY, device, seq, 1_700_000_000_000 + seq, values)
    name = topic(TopicKind.TELEMETRY, SITE, GATEWAY, device)
    payload = encode_record(record, encoding)
    entry_id = next(_ids)
    return Entry(
        entry_id, name, payload, False, Priority.TELEMETRY, 1_700_000_000_000 + entry_id, len(name) + len(payload)
    )


def control_entry(payload: bytes = b'{"state":"online"}', *, retain: bool = True, device: str = "a") -> Entry:
    name = topic(TopicKind.DEVICE_STATUS, SITE, GATEWAY, device)
    entry_id = next(_ids)
    return Entry(
        entry_id, name, payload, retain, Priority.CONTROL, 1_700_000_000_000 + entry_id, len(name) + len(payload)
    )


def lane_of(entries: list[Entry], weight: float = 1.0, name: str = "lane") -> Lane:
    lane = Lane(name, weight, _reader(entries))
    lane.ready.extend(entries)
    return lane


def _reader(entries: list[Entry]) -> Callable[[int, int], Awaitable[list[Entry]]]:
    async def read(after: int, limit: int) -> list[Entry]:
        return [e for e in entries if e.id > after][:limit]

    return read


def drain(lane: Lane, joiner: BatchJoiner, max_records: int = 1000, max_bytes: int = 128_000) -> list[OutgoingMessage]:
    out = []
    while lane.ready:
        message = lane.next_message(joiner, max_records, max_bytes)
        lane.sent(message)
        out.append(message)
    return out


def records_of(entries: list[Entry]) -> list[Record]:
    return [decode(e.payload)[0] for e in entries]


@pytest.fixture
def joiner() -> BatchJoiner:
    return BatchJoiner(SITE, GATEWAY)


# --- next_message ------------------------------------------------------------------------


def test_consecutive_records_are_joined_up_to_batch_max_records(joiner: BatchJoiner) -> None:
    entries = [record_entry("ab"[i % 2], seq=i) for i in range(7)]
    messages = drain(lane_of(entries), joiner, max_records=3)
    assert [m.records for m in messages] == [3, 3, 1]
    assert [m.entries for m in messages] == [entries[0:3], entries[3:6], entries[6:7]]
    for message in messages[:2]:
        assert message.topic == BATCH_TOPIC
        assert not message.retain
        assert decode(message.payload) == records_of(message.entries)
    # A record left on its own goes as a record envelope on its device's telemetry topic, unchanged.
    last = messages[2]
    assert (last.topic, last.payload, last.retain) == (entries[6].topic, entries[6].payload, False)


def test_a_batch_counts_past_fifteen_records(joiner: BatchJoiner) -> None:
    # msgpack arrays of 16 and more records need the array16 header.
    entries = [record_entry(seq=i) for i in range(40)]
    (message,) = drain(lane_of(entries), joiner)
    assert message.records == 40
    assert decode(message.payload) == records_of(entries)


def test_batches_stay_within_batch_max_bytes(joiner: BatchJoiner) -> None:
    entries = [record_entry(seq=i, extra=(i * 37) % 120) for i in range(40)]
    max_bytes = 600
    messages = drain(lane_of(entries), joiner, max_bytes=max_bytes)
    assert [e for m in messages for e in m.entries] == entries
    for i, message in enumerate(messages):
        assert len(message.payload) <= max_bytes
        assert decode(message.payload) == records_of(message.entries)
        if i + 1 < len(messages):  # full: the next record would not have fit
            used = sum(len(e.payload) for e in message.entries)
            assert used + len(messages[i + 1].entries[0].payload) > max_bytes
    assert any(m.records >= 3 for m in messages)


def test_a_record_bigger_than_batch_max_bytes_goes_alone(joiner: BatchJoiner) -> None:
    big = record_entry(seq=2, extra=2000)
    entries = [record_entry(seq=1), big, record_entry(seq=3)]
    messages = drain(lane_of(entries), joiner, max_bytes=1000)
    assert [m.entries for m in messages] == [[entries[0]], [big], [entries[2]]]
    assert messages[1].payload == big.payload
    assert messages[1].topic == big.topic


def test_a_control_message_ends_a_batch_and_goes_alone_with_its_retain_flag(joiner: BatchJoiner) -> None:
    r = [record_entry(seq=i) for i in range(5)]
    offline = control_entry(b'{"state":"offline"}', retain=True)
    result = control_entry(b'{"ok":true}', retain=False, device="b")
    entries = [offline, r[0], r[1], result, r[2], r[3], offline_again := control_entry(retain=True), r[4]]
    messages = drain(lane_of(entries), joiner)
    assert [m.entries for m in messages] == [[offline], r[0:2], [result], r[2:4], [offline_again], [r[4]]]
    assert [m.records for m in messages] == [0, 2, 0, 2, 0, 1]
    for message in (messages[0], messages[2], messages[4]):
        (control,) = message.entries
        assert (message.topic, message.payload, message.retain) == (control.topic, control.payload, control.retain)
    assert [m.topic for m in messages[1::2]] == [BATCH_TOPIC, BATCH_TOPIC, r[4].topic]


def test_batch_max_records_one_sends_every_record_as_it_was_buffered(joiner: BatchJoiner) -> None:
    entries = [record_entry(seq=i) for i in range(4)]
    messages = drain(lane_of(entries), joiner, max_records=1)
    assert [(m.topic, m.payload, m.records) for m in messages] == [(e.topic, e.payload, 1) for e in entries]


@pytest.mark.parametrize("stored", list(Encoding))
@pytest.mark.parametrize("wire", list(Encoding))
def test_batches_are_in_the_uplink_encoding_whatever_the_buffer_holds(stored: Encoding, wire: Encoding) -> None:
    joiner = BatchJoiner(SITE, GATEWAY, wire)
    entries = [record_entry("ab"[i % 2], seq=i, encoding=stored) for i in range(5)]
    (message,) = drain(lane_of(entries), joiner)
    assert decode(message.payload) == records_of(entries)
    assert (message.payload[:1] == b"{") == (wire is Encoding.JSON)
    assert joiner.reencoded == (0 if stored is wire else 5)


def test_sent_counts_bytes_messages_records_and_the_age_of_the_last_entry(joiner: BatchJoiner) -> None:
    entries = [record_entry(seq=1), record_entry(seq=2), control_entry(), record_entry(seq=3)]
    lane = lane_of(entries)
    messages = drain(lane, joiner)
    assert lane.sent_messages == len(messages) == 3
    assert lane.sent_records == 3
    assert lane.sent_bytes == sum(len(m.payload) for m in messages)
    assert lane.last_sent_created_ms == entries[-1].created_ms


def test_refill_reads_after_its_cursor_and_says_whether_more_may_wait() -> None:
    entries = [record_entry(seq=i) for i in range(5)]
    lane = Lane("backlog", 0.5, _reader(entries))

    async def main() -> list[tuple[bool, int, bool]]:
        steps = []
        for _ in range(4):
            steps.append((await lane.refill(2), lane.cursor, lane.more))
        return steps

    assert asyncio.run(main()) == [
        (True, entries[1].id, True),
        (True, entries[3].id, True),
        # Fewer than asked is not "nothing more": the buffer may have cut the answer short.
        (True, entries[4].id, True),
        (False, entries[4].id, False),  # only an empty answer is
    ]
    assert list(lane.ready) == entries


def test_records_stored_under_an_old_gateway_id_go_out_alone_as_stored(joiner: BatchJoiner) -> None:
    # The gateway's id changed with records still buffered: they cannot join this gateway's
    # batches, and must not block the lane either.
    old = Record(SITE, "gw-old", "a", 7, 1_700_000_000_000, {"t": Value.of(1.0)})
    name = topic(TopicKind.TELEMETRY, SITE, "gw-old", "a")
    payload = encode_record(old)
    entry_id = next(_ids)
    stranger = Entry(entry_id, name, payload, False, Priority.TELEMETRY, 1_700_000_000_000, len(name) + len(payload))
    entries = [record_entry(seq=1), record_entry(seq=2), stranger, stranger_copy := record_entry(seq=3)]
    messages = drain(lane_of(entries), joiner)
    assert [m.topic for m in messages] == [BATCH_TOPIC, name, stranger_copy.topic]
    assert messages[1].payload == payload
    assert [len(m.entries) for m in messages] == [2, 1, 1]


# --- pick_lane ---------------------------------------------------------------------------


def test_pick_lane_takes_only_lanes_with_something_ready() -> None:
    live, backlog = lane_of([], 0.5, "live"), lane_of([], 0.5, "backlog")
    assert pick_lane([live, backlog]) is None
    backlog.ready.append(record_entry())
    assert pick_lane([live, backlog]) is backlog
    backlog.sent_cost = 10**9  # far beyond its share: still the only one with data
    assert pick_lane([live, backlog]) is backlog


@pytest.mark.parametrize("share", [0.1, 0.5, 0.8])
def test_with_both_lanes_ready_the_bytes_sent_converge_to_the_configured_share(
    joiner: BatchJoiner, share: float
) -> None:
    # Live: single records between status messages (small messages). Backlog: big batches.
    live = Lane("live", share, _reader([]))
    backlog = Lane("backlog", 1 - share, _reader([]))
    seqs = itertools.count()

    def top_up() -> None:
        while len(live.ready) < 10:
            live.ready.extend([record_entry("live", next(seqs)), control_entry(b"{}" * 5, retain=False)])
        while len(backlog.ready) < 200:
            backlog.ready.append(record_entry("old", next(seqs), extra=40))

    biggest = 0
    for step in range(5000):
        top_up()
        lane = pick_lane([live, backlog])
        assert lane is not None
        message = lane.next_message(joiner, 50, 8000)
        lane.sent(message)
        biggest = max(biggest, len(message.payload))
        if step > 10:
            # Never further from the share than one message: a weighted fair queue.
            assert abs(live.sent_bytes / share - backlog.sent_bytes / (1 - share)) <= biggest / min(share, 1 - share)
    total = live.sent_bytes + backlog.sent_bytes
    # Off by at most one message, which is a small part of what went.
    assert abs(live.sent_bytes / total - share) <= biggest / total < 0.03
    assert backlog.sent_messages < live.sent_messages or share < 0.5  # the backlog went in batches
    assert backlog.sent_records > backlog.sent_messages * 10


def test_under_a_messages_per_second_cap_the_lanes_share_messages_not_bytes(joiner: BatchJoiner) -> None:
    # Live sends tiny messages, the backlog big batches. Shared by bytes, live would take
    # nearly every message token of the cap and the backlog would crawl; charged per message
    # (the binding limit), each lane gets its share of the messages.
    live = Lane("live", 0.5, _reader([]))
    backlog = Lane("backlog", 0.5, _reader([]))
    seqs = itertools.count()
    per_message = 1 / 20  # max_messages_per_s = 20
    for _ in range(200):
        while len(live.ready) < 4:
            live.ready.append(record_entry("live", next(seqs)))
            live.ready.append(control_entry(b"{}", retain=False))  # keeps live messages single
        while len(backlog.ready) < 100:
            backlog.ready.append(record_entry("old", next(seqs), extra=40))
        lane = pick_lane([live, backlog])
        assert lane is not None
        lane.sent(lane.next_message(joiner, 50, 8000), per_message)
    assert abs(live.sent_messages - backlog.sent_messages) <= 1
    assert backlog.sent_records > 10 * live.sent_records / 2  # the backlog moves in batches


# --- RateLimit ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(lanes, "time", SimpleNamespace(monotonic=fake))
    return fake


def test_a_rate_limit_allows_one_second_of_burst_then_makes_senders_wait(clock: Clock) -> None:
    limit = RateLimit(10)  # 10 per second
    for _ in range(10):
        assert limit.wait_time() == 0
        limit.spend(1)
    # The eleventh in the same instant goes into debt and the next one waits for it.
    assert limit.wait_time() == 0
    limit.spend(1)
    assert limit.wait_time() == pytest.approx(0.1)
    limit.spend(20)  # one big message: two more seconds of debt
    assert limit.wait_time() == pytest.approx(2.1)
    clock.now += 1.0
    assert limit.wait_time() == pytest.approx(1.1)
    clock.now += 1.1
    assert limit.wait_time() == 0
    # A long pause earns at most one second of burst, not an unlimited one.
    clock.now += 3600
    assert limit.wait_time() == 0  # the uplink asks before it spends
    limit.spend(10)
    assert limit.wait_time() == 0
    limit.spend(1)
    assert limit.wait_time() == pytest.approx(0.1)


def test_spending_faster_than_the_rate_makes_the_wait_grow(clock: Clock) -> None:
    limit = RateLimit(1000)  # bytes per second
    waits = []
    for _ in range(20):
        limit.spend(400)  # 400 bytes every 100 ms: 4000 B/s against 1000
        waits.append(limit.wait_time())
        clock.now += 0.1
    assert waits[-1] > 0
    assert all(b >= a for a, b in itertools.pairwise(waits))
    assert waits[-1] - waits[-2] == pytest.approx(0.3)  # 300 bytes of new debt per step, at 1000 B/s


def test_rate_zero_is_unlimited(clock: Clock) -> None:
    limit = RateLimit(0)
    for _ in range(1000):
        limit.spend(10**9)
        assert limit.wait_time() == 0
