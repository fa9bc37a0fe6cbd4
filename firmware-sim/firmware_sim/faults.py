"""Faults a simulated unit can be told to have, switched at run time from tests.

::

    fleet.set_fault("line1", 3, Fault.no_response())        # silence: the client times out
    fleet.set_fault("line1", 3, Fault.slow(0.3))            # answer 0.3 s late
    fleet.set_fault("line1", 3, Fault.exception(6))         # "device busy"
    fleet.set_fault("line1", 3, Fault.exception(2, addresses=range(100, 110)))
    fleet.set_fault("bus1", 5, Fault.bad_crc())             # RTU only: a corrupt reply
    fleet.set_fault("line1", 3, Fault.drop_connection())    # TCP and rtu_tcp only
    fleet.clear_fault("line1", 3)

Each constructor takes ``addresses``: the fault then hits only requests touching
one of those addresses (of any table); other requests are served normally.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Fault", "FaultKind"]


class FaultKind(enum.Enum):
    NO_RESPONSE = "no_response"
    SLOW = "slow"
    EXCEPTION = "exception"
    BAD_CRC = "bad_crc"
    DROP_CONNECTION = "drop_connection"


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    delay: float = 0.0  # SLOW: seconds before the reply
    code: int = 0  # EXCEPTION: the exception code answered
    addresses: range | None = None  # None: every request of the unit

    @classmethod
    def no_response(cls, addresses: range | None = None) -> Fault:
        """Say nothing at all: the client's request times out (TCP and RTU)."""
        return cls(FaultKind.NO_RESPONSE, addresses=addresses)

    @classmethod
    def slow(cls, seconds: float, addresses: range | None = None) -> Fault:
        """Answer correctly, ``seconds`` late. On an RTU bus the whole bus waits, as it would."""
        if seconds < 0:
            raise ValueError(f"a delay must be >= 0, got {seconds}")
        return cls(FaultKind.SLOW, delay=seconds, addresses=addresses)

    @classmethod
    def exception(cls, code: int = 6, addresses: range | None = None) -> Fault:
        """Answer every request with this exception code (6: server device busy)."""
        if not 1 <= code <= 0xFF:
            raise ValueError(f"an exception code is 1..255, got {code}")
        return cls(FaultKind.EXCEPTION, code=code, addresses=addresses)

    @classmethod
    def bad_crc(cls, addresses: range | None = None) -> Fault:
        """RTU (serial or over TCP): send the right reply with its CRC inverted."""
        return cls(FaultKind.BAD_CRC, addresses=addresses)

    @classmethod
    def drop_connection(cls, addresses: range | None = None) -> Fault:
        """TCP and rtu_tcp: close the client's connection instead of answering."""
        return cls(FaultKind.DROP_CONNECTION, addresses=addresses)

    def hits(self, spans: Sequence[range]) -> bool:
        """Whether a request touching ``spans`` suffers this fault."""
        if self.addresses is None:
            return True
        wanted = self.addresses
        return any(s.start < wanted.stop and wanted.start < s.stop for s in spans)
