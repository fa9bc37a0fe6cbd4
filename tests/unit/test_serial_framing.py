"""Cutting serial byte streams into frames: delimiters split across reads, fixed length, over-long runs."""

from __future__ import annotations

import pytest

from gateway.sources.serial.config import parse_delimiter
from gateway.sources.serial.framing import DelimiterFramer, FixedLengthFramer


def feed_all(framer: DelimiterFramer | FixedLengthFramer, chunks: list[bytes]) -> list[bytes]:
    return [frame for chunk in chunks for frame in framer.feed(chunk)]


def test_delimiter_frames_across_reads() -> None:
    framer = DelimiterFramer(b"\n", max_frame=100)
    assert framer.feed(b"T=21") == []
    assert framer.feed(b".5\nH=4") == [b"T=21.5"]
    assert framer.feed(b"0\n\nX=1\nY") == [b"H=40", b"", b"X=1"]


@pytest.mark.parametrize("split", range(1, 12))
def test_a_two_byte_delimiter_split_anywhere(split: int) -> None:
    stream = b"A=1\r\nB=2\r\n"
    framer = DelimiterFramer(b"\r\n", max_frame=100)
    assert feed_all(framer, [stream[:split], stream[split:]]) == [b"A=1", b"B=2"]


def test_byte_by_byte_with_a_long_delimiter() -> None:
    stream = b"one<END>two<E<END>three<END>"
    framer = DelimiterFramer(b"<END>", max_frame=10)
    assert feed_all(framer, [bytes([b]) for b in stream]) == [b"one", b"two<E", b"three"]


def test_a_frame_of_exactly_max_frame_bytes_is_kept() -> None:
    framer = DelimiterFramer(b"\r\n", max_frame=4)
    assert feed_all(framer, [b"abcd\r", b"\nabcde\r\nok\r\n"]) == [b"abcd", b"ok"]
    assert framer.overlong == 1


def test_an_overlong_run_is_discarded_and_counted_once_without_growing() -> None:
    framer = DelimiterFramer(b"\n", max_frame=16)
    frames = feed_all(framer, [b"ok=1\n"] + [b"x" * 10] * 1000)
    assert frames == [b"ok=1"]
    assert framer.overlong == 1
    assert len(framer._buffer) <= 16  # memory stays bounded however long the run
    # The end of the run is not a frame; the next line is.
    assert framer.feed(b"tail of junk\nT=2\n") == [b"T=2"]
    assert framer.overlong == 1
    assert framer.feed(b"y" * 40 + b"\nH=3\n") == [b"H=3"]
    assert framer.overlong == 2


def test_reset_forgets_a_partial_frame() -> None:
    framer = DelimiterFramer(b"\n", max_frame=8)
    framer.feed(b"T=2")
    framer.reset()
    assert framer.feed(b"H=4\n") == [b"H=4"]


def test_fixed_length_frames() -> None:
    framer = FixedLengthFramer(4)
    assert feed_all(framer, [b"ab", b"cdef", b"ghij", b"k"]) == [b"abcd", b"efgh"]
    assert framer.feed(b"l") == [b"ijkl"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("\n", b"\n"),
        ("\r\n", b"\r\n"),
        ("\\r\\n", b"\r\n"),  # a TOML literal string: '\r\n'
        ("\\x03", b"\x03"),
        ("\u0003", b"\x03"),
        ("<END>", b"<END>"),
        ("\\\\n", b"\\n"),
        ("\\t|\\0", b"\t|\x00"),
    ],
)
def test_delimiter_escapes(given: str, expected: bytes) -> None:
    assert parse_delimiter(given) == expected


@pytest.mark.parametrize("given", ["", "\u20ac", 5])
def test_bad_delimiters(given: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (the message is checked in test_serial_config)
        parse_delimiter(given)
