"""Store-and-forward: nothing bound for the cloud leaves it before the broker acknowledged it."""

from gateway.buffer.service import BufferError, StoreAndForwardBuffer
from gateway.buffer.sqlite_store import BufferStats, Entry

__all__ = ["BufferError", "BufferStats", "Entry", "StoreAndForwardBuffer"]
