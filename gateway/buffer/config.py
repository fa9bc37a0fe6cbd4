"""``[buffer]``: where the store-and-forward buffer lives, how durable it is, and its bounds."""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field

from fieldlink.configkit import ByteSize, Duration, Schema

__all__ = ["BufferConfig", "DropReason", "Durability", "Eviction"]


class Durability(enum.StrEnum):
    DURABLE = "durable"  # on disk (fsync'd) before it counts as buffered
    SPILL = "spill"  # in memory while the uplink keeps up; on disk when it does not


class Eviction(enum.StrEnum):
    DROP_OLDEST = "drop-oldest"
    REJECT_NEW = "reject-new"


class DropReason(enum.StrEnum):
    """Why a message left the buffer without reaching the cloud (health: ``drops``)."""

    MAX_BYTES = "max_bytes"
    MIN_FREE_DISK = "min_free_disk"
    MAX_AGE = "max_age"
    WRITE_ERROR = "write_error"  # the disk refused the write (full, I/O error)
    INVALID = "invalid"  # a reading the wire format cannot carry (never entered the buffer)
    REFUSED = "refused_by_broker"  # an MQTT 5 broker answered the PUBLISH with a failure code (ACL)


class BufferConfig(Schema):
    path: Path = Path("buffer.db")  # relative paths are under gateway.state_dir
    durability: Durability = Durability.DURABLE
    spill_after: Duration = Field(default=2.0, gt=0, description="spill: unacknowledged this long, go to disk")
    spill_memory: ByteSize = Field(default=8_000_000, gt=0, description="spill: most bytes held in memory")
    max_bytes: ByteSize = Field(default=1_000_000_000, gt=0)
    max_age: Duration | None = 7 * 86400.0
    min_free_disk: ByteSize = 100_000_000
    eviction: Eviction = Eviction.DROP_OLDEST
