"""``[uplink]``: the cloud broker, and how the buffer is forwarded to it."""

from __future__ import annotations

from pydantic import Field

from fieldlink.configkit import ByteSize, Duration, TopicPrefix
from fieldlink.mqtt import MqttSettings
from fieldlink.wire import Encoding

__all__ = ["UplinkConfig"]


class UplinkConfig(MqttSettings):
    encoding: Encoding = Encoding.MSGPACK
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 60.0
    max_inflight: int = Field(default=50, ge=1, le=1000)
    max_inflight_bytes: ByteSize = Field(default=1_000_000, ge=1)
    # A PUBACK this late means the link is dead even if TCP has not noticed (a stalled
    # cellular link can take many minutes to time out): drop it and reconnect.
    ack_timeout: Duration = Field(default=15.0, gt=0)
    # Replay and catch-up in batch envelopes; 1 sends every record on its own.
    batch_max_records: int = Field(default=1000, ge=1, le=65535)
    batch_max_bytes: ByteSize = Field(default=128_000, ge=256)
    # Fresh records wait this long for company before they go out: fewer, larger messages.
    batch_linger: Duration = Field(default=0.005, le=1.0)
    # While a backlog drains, live data gets at least this share of the link.
    live_share: float = Field(default=0.5, gt=0, lt=1)
    max_messages_per_s: float = Field(default=0, ge=0)  # 0: unlimited
    max_bytes_per_s: ByteSize = 0  # 0: unlimited
    # Prepended to every topic on the cloud broker (multi-tenant brokers, ACL namespaces).
    topic_prefix: TopicPrefix = ""
    commands: bool = Field(default=True, description="relay command topics from the cloud to the local broker")
