"""Store-and-forward: nothing bound for the cloud leaves it before the broker acknowledged it."""

from gateway.buffer.config import BufferConfig, DropReason, Durability, Eviction
from gateway.buffer.service import BufferError, StoreAndForwardBuffer
from gateway.buffer.sqlite_store import BufferStats, Entry, Priority

__all__ = [
    "BufferConfig",
    "BufferError",
    "BufferStats",
    "DropReason",
    "Durability",
    "Entry",
    "Eviction",
    "Priority",
    "StoreAndForwardBuffer",
]
