"""Cutting a byte stream into frames: by a delimiter, or by a fixed length.

A framer holds at most ``max_frame`` bytes however long the sensor talks without a
delimiter: an over-long run is discarded, and so is the rest of it up to the next
delimiter (its end is no frame either). Each such run counts once in ``overlong``.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["DelimiterFramer", "FixedLengthFramer", "Framer"]


class Framer(Protocol):
    overlong: int  # runs discarded for being longer than max_frame

    def feed(self, data: bytes) -> list[bytes]:
        """The frames completed by ``data``, without their delimiters; keeps the unfinished rest."""
        ...

    def reset(self) -> None:
        """Forget a partial frame (the port was reopened: its end will never come)."""
        ...


class DelimiterFramer:
    def __init__(self, delimiter: bytes, max_frame: int) -> None:
        if not delimiter:
            raise ValueError("delimiter must not be empty")
        self.delimiter = delimiter
        self.max_frame = max_frame
        self.overlong = 0
        self._buffer = bytearray()
        self._skipping = False  # inside an over-long run: drop bytes up to the next delimiter
        self._scanned = 0  # bytes of _buffer known to hold no delimiter start

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        width = len(self.delimiter)
        start = 0
        while (end := self._buffer.find(self.delimiter, max(start, self._scanned))) >= 0:
            frame = bytes(self._buffer[start:end])
            start = end + width
            self._scanned = start
            if self._skipping:
                self._skipping = False  # the tail of an over-long run: already counted
            elif len(frame) > self.max_frame:
                self.overlong += 1
            else:
                frames.append(frame)
        del self._buffer[:start]
        # A delimiter may be split across reads: its first bytes can be at the end.
        self._scanned = max(0, len(self._buffer) - width + 1)
        if len(self._buffer) > self.max_frame + width - 1:
            if not self._skipping:
                self.overlong += 1
                self._skipping = True
            keep = width - 1  # a delimiter's start may be the last bytes
            del self._buffer[: len(self._buffer) - keep]
            self._scanned = 0
        return frames

    def reset(self) -> None:
        self._buffer.clear()
        self._skipping = False
        self._scanned = 0


class FixedLengthFramer:
    """Every ``length`` bytes is a frame; for sensors that send fixed-size records without a delimiter."""

    def __init__(self, length: int) -> None:
        if length < 1:
            raise ValueError("frame length must be at least 1")
        self.length = length
        self.overlong = 0  # cannot happen: a frame is never longer than its length
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        count = len(self._buffer) // self.length
        frames = [bytes(self._buffer[i * self.length : (i + 1) * self.length]) for i in range(count)]
        del self._buffer[: count * self.length]
        return frames

    def reset(self) -> None:
        self._buffer.clear()
