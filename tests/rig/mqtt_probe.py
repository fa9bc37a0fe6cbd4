"""A small synchronous MQTT subscriber to assert on what reached a broker."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode


class ProbeMessage(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


Predicate = Callable[[list[ProbeMessage]], bool]


def at_least(count: int) -> Predicate:
    """Predicate for `MqttProbe.wait_for`: at least `count` messages arrived."""
    return lambda messages: len(messages) >= count


class MqttProbe:
    """Subscribes to `topics` and collects every message; use as a context manager.

    paho's network loop runs in its own thread (`loop_start`): fine for a test
    probe, which only needs to be simple and independent of the code under test.

    `clean_session=False` makes the probe a persistent subscriber that outlives a
    broker restart: paho reconnects on its own (within a second or two), the broker
    delivers what it queued meanwhile, and a session the broker lost is counted in
    `sessions_lost` (and subscribed again, so the probe keeps listening).
    """

    def __init__(
        self,
        host: str,
        port: int,
        topics: Sequence[str],
        qos: int = 1,
        *,
        clean_session: bool = True,
        client_id: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.topics = list(topics)
        self.qos = qos
        self.clean_session = clean_session
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:12]}"
        self._messages: list[ProbeMessage] = []
        self._arrivals: list[float] = []  # time.time() of each message, parallel to _messages
        self._changed = threading.Condition()
        self._connack: ReasonCode | None = None
        self._suback: dict[int, list[ReasonCode]] = {}
        self.connects = 0  # CONNACKs accepted, the first one included
        self.sessions_lost = 0  # reconnects of a persistent probe that found no session
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=clean_session)
        if not clean_session:
            self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # paho callbacks, called from its network thread.
    def _on_connect(self, client: Any, _u: Any, flags: Any, reason_code: ReasonCode, _p: Any) -> None:
        with self._changed:
            first = self._connack is None
            self._connack = reason_code
            if not reason_code.is_failure:
                self.connects += 1
            self._changed.notify_all()
        # A reconnect without the old session: a persistent probe subscribes again (and
        # counts the loss); a clean-session probe stays deaf after a reconnect, as before.
        if not (first or reason_code.is_failure or flags.session_present or self.clean_session):
            with self._changed:
                self.sessions_lost += 1
            client.subscribe([(topic, self.qos) for topic in self.topics])

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reason_codes: list[ReasonCode], _p: Any) -> None:
        with self._changed:
            self._suback[mid] = list(reason_codes)
            self._changed.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._changed:
            self._messages.append(ProbeMessage(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._arrivals.append(time.time())
            self._changed.notify_all()

    def _wait(self, done: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"MQTT probe {self.host}:{self.port}: {what()} after {timeout:.1f} s")
                self._changed.wait(remaining)

    def connect(self, timeout: float = 5.0) -> None:
        """Connect and subscribe; return only once CONNACK and SUBACK arrived, so nothing is missed."""
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        self._wait(lambda: self._connack is not None, timeout, lambda: "no CONNACK")
        if self._connack is not None and self._connack.is_failure:
            raise ConnectionError(f"MQTT probe {self.host}:{self.port}: CONNACK {self._connack}")
        result, mid = self._client.subscribe([(topic, self.qos) for topic in self.topics])
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionError(f"MQTT probe: subscribe failed: {mqtt.error_string(result)}")
        self._wait(lambda: mid in self._suback, timeout, lambda: f"no SUBACK for {self.topics}")
        refused = [str(rc) for rc in self._suback[mid] if rc.is_failure]
        if refused:
            raise ConnectionError(f"MQTT probe: subscription to {self.topics} refused: {refused}")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Self:
        try:
            self.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def messages(self) -> list[ProbeMessage]:
        with self._changed:
            return list(self._messages)

    @property
    def timed_messages(self) -> list[tuple[float, ProbeMessage]]:
        """(arrival time as time.time(), message) of every message, in arrival order."""
        with self._changed:
            return list(zip(self._arrivals, self._messages, strict=True))

    def wait_for(self, until: int | Predicate, timeout: float = 10.0) -> list[ProbeMessage]:
        """Block until `until` messages arrived, or until `until(messages)` is true; return a copy."""
        if isinstance(until, int):
            predicate, what = at_least(until), f"{until} messages"
        else:
            predicate, what = until, "the expected messages"

        def received() -> str:
            last = [m.topic for m in self._messages[-5:]]
            return f"waited for {what}, got {len(self._messages)} (last topics: {last})"

        self._wait(lambda: predicate(list(self._messages)), timeout, received)
        return self.messages
