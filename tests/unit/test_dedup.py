"""The deduplicator drops what was stored before, and only that."""

from __future__ import annotations

from cloud.dedup import Deduplicator
from fieldlink.wire import BatchScanner, Record, Value, decode, encode_batch


def rec(seq: int, device: str = "boiler-1", *, gateway: str = "gw-1", site: str = "plant-1") -> Record:
    return Record(site, gateway, device, seq, 1_700_000_000_000 + seq, {"t": Value.of(float(seq))})


def seqs(records: list[Record]) -> list[int]:
    return [r.seq for r in records]


def test_fresh_returns_new_records_and_drops_committed_ones() -> None:
    dedup = Deduplicator()
    first = [rec(1), rec(2), rec(3)]
    assert dedup.fresh(first) == first
    dedup.commit(first)
    assert seqs(dedup.fresh([rec(2), rec(3), rec(4)])) == [4]
    assert dedup.dropped_total == 2


def test_duplicates_inside_one_batch_are_dropped() -> None:
    dedup = Deduplicator()
    assert seqs(dedup.fresh([rec(1), rec(2), rec(1), rec(2), rec(3)])) == [1, 2, 3]
    assert dedup.dropped_total == 2


def test_uncommitted_records_are_not_dropped_on_redelivery() -> None:
    dedup = Deduplicator()
    batch = [rec(1), rec(2)]
    assert dedup.fresh(batch) == batch
    # The store failed: nothing is committed, the broker redelivers the same records.
    assert dedup.fresh(batch) == batch
    assert dedup.dropped_total == 0
    dedup.commit(batch)
    assert dedup.fresh(batch) == []
    assert dedup.dropped_total == 2


def test_series_are_per_site_gateway_and_device() -> None:
    dedup = Deduplicator()
    dedup.commit([rec(1)])
    others = [rec(1, "boiler-2"), rec(1, gateway="gw-2"), rec(1, site="plant-2")]
    assert dedup.fresh(others) == others
    assert dedup.fresh([rec(1)]) == []


def test_same_seq_of_different_devices_in_one_batch_are_all_fresh() -> None:
    dedup = Deduplicator()
    batch = [rec(7, "a"), rec(7, "b"), rec(7, "a")]
    assert [(r.device, r.seq) for r in dedup.fresh(batch)] == [("a", 7), ("b", 7)]


def test_window_eviction_lets_an_old_seq_through_again() -> None:
    dedup = Deduplicator(window=3)
    dedup.commit([rec(1), rec(2), rec(3)])
    assert dedup.fresh([rec(1), rec(2), rec(3)]) == []
    dedup.commit([rec(4)])  # the window holds 2, 3, 4 now: 1 is forgotten
    assert seqs(dedup.fresh([rec(1), rec(2), rec(3), rec(4)])) == [1]
    dedup.commit([rec(5), rec(6)])
    assert seqs(dedup.fresh([rec(s) for s in range(1, 7)])) == [1, 2, 3]


def test_window_evicts_the_lowest_seq_even_when_committed_out_of_order() -> None:
    dedup = Deduplicator(window=3)
    dedup.commit([rec(10), rec(2), rec(7), rec(5)])  # 2 is the lowest: it goes
    assert seqs(dedup.fresh([rec(2), rec(5), rec(7), rec(10)])) == [2]


def test_committing_twice_does_not_push_records_out_of_the_window() -> None:
    dedup = Deduplicator(window=3)
    batch = [rec(1), rec(2), rec(3)]
    dedup.commit(batch)
    dedup.commit(batch)
    dedup.commit(batch)
    assert dedup.fresh(batch) == []


def test_dropped_total_counts_every_drop() -> None:
    dedup = Deduplicator()
    assert dedup.dropped_total == 0
    dedup.commit([rec(1), rec(2)])
    dedup.fresh([rec(1), rec(1), rec(2), rec(3), rec(3)])  # 1, 1, 2 seen before; the second 3 repeats
    assert dedup.dropped_total == 4
    dedup.fresh([rec(2)])
    assert dedup.dropped_total == 5


def test_scanned_records_share_the_series_of_records() -> None:
    # The ingest hot path carries ScannedRecords (batch envelopes read from their bytes),
    # the rest Records: a replay must be dropped whichever way either copy was read.
    first = [rec(1), rec(2)]
    payload = encode_batch("plant-1", "gw-1", first)
    scanner = BatchScanner()
    scanner.learn(payload, decode(payload))
    scanned = scanner.scan(payload)
    assert scanned is not None
    again = scanned[2]
    dedup = Deduplicator()
    dedup.commit(first)
    assert dedup.fresh(again) == []
    dedup = Deduplicator()
    dedup.commit(again)
    assert seqs(dedup.fresh([rec(1), rec(2), rec(3)])) == [3]
    assert [r.seq for r in dedup.fresh([*again, *again])] == []
    assert dedup.dropped_total == 6
    fresh = Deduplicator().fresh([again[0], rec(1), again[0]])
    assert fresh == [again[0]]
