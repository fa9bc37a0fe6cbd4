"""MqttConnection against a real mosquitto: TLS, client certificates, passwords, MQTT 3.1.1 and 5.

Every refusal must come out of `open()` as a ConnectFailed whose reason tells an
operator what to fix; these tests pin the wording that matters (the file named,
"expired", "bad username or password"), not every word.
"""

from __future__ import annotations

import asyncio
import re
import select
import socket
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from paho.mqtt.client import convert_connack_rc_to_reason_code
from paho.mqtt.enums import ConnackCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from cloud.config import load_cloud_config
from fieldlink.configkit import ConfigError, Schema, load_config
from fieldlink.mqtt import (
    ConnectFailed,
    MqttConnection,
    MqttSettings,
    PublishRefused,
    TlsSettings,
    _pending_tls_alert,
    build_tls_context,
    describe_refusal,
    describe_tls_error,
    parse_broker_url,
)
from tests.rig.certs import CertPair, Pki, make_pki
from tests.rig.mosquitto import Mosquitto, TlsListener
from tests.rig.ports import LOOPBACK

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
DEADLINE = 30.0
PROTOCOLS = ["3.1.1", "5"]
USER, PASSWORD = "gateway-7", "correct horse"

# Production runs on uvloop (fieldlink.runner); the adapter hands paho's SSL socket to
# the loop's add_reader/add_writer, so the TLS paths run on both loops.
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {
    "asyncio": None,
    "uvloop": uvloop.new_event_loop,
}


def run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    async def bounded() -> T:
        async with asyncio.timeout(DEADLINE):
            return await coro

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(bounded())


def client_id() -> str:
    return f"sec-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One CA, server, client, expired client and unrelated CA for the whole session."""
    return make_pki(tmp_path_factory.mktemp("pki"))


BrokerFactory = Callable[..., Mosquitto]


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[BrokerFactory]:
    """Starts a mosquitto with a TLS listener (server certificate from `pki`); stopped at teardown."""
    started: list[Mosquitto] = []

    def start(
        *,
        require_certificate: bool = False,
        use_identity_as_username: bool = False,
        users: dict[str, str] | None = None,
        extra_conf: str = "",
        server: CertPair | None = None,
    ) -> Mosquitto:
        server = server or pki.server
        listener = TlsListener(
            cafile=pki.ca,
            certfile=server.cert,
            keyfile=server.key,
            require_certificate=require_certificate,
            use_identity_as_username=use_identity_as_username,
        )
        broker = Mosquitto(
            tmp_path / f"mosquitto-{len(started)}", persistence=False, tls=listener, users=users, extra_conf=extra_conf
        )
        started.append(broker)
        broker.start()
        return broker

    yield start
    for broker in started:
        broker.stop()


def tls_settings(broker: Mosquitto, **tls: Any) -> MqttSettings:
    return MqttSettings(url=broker.tls_url, tls=TlsSettings(**tls), connect_timeout=10)


async def refusal(settings: MqttSettings) -> str:
    """The reason of the ConnectFailed that open() must raise."""
    conn = MqttConnection(settings, client_id=client_id())
    with pytest.raises(ConnectFailed) as caught:
        await conn.open()
    conn.abort()
    # The session is over for good: nothing can be waiting on it any more.
    assert not conn.is_open
    return caught.value.reason


async def publish_one(settings: MqttSettings) -> None:
    """Connect, publish at QoS 1 and wait for the PUBACK, disconnect."""
    conn = MqttConnection(settings, client_id=client_id())
    await conn.open()
    try:
        assert conn.is_open
        await conn.publish(f"fieldlink-sec/{uuid.uuid4().hex[:8]}", b"hello", qos=1)
    finally:
        await conn.close()


# --- server verification ---------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_with_the_right_ca_connects_and_gets_pubacks(
    tls_broker: BrokerFactory, pki: Pki, protocol: str, loop: str
) -> None:
    broker = tls_broker()
    settings = tls_settings(broker, ca_file=pki.ca).model_copy(update={"protocol": protocol})
    run(publish_one(settings), loop)


def test_a_name_the_certificate_lists_or_server_name_verifies(tls_broker: BrokerFactory, pki: Pki) -> None:
    broker = tls_broker()
    by_name = MqttSettings(url=f"mqtts://localhost:{broker.tls_port}", tls=TlsSettings(ca_file=pki.ca))
    run(publish_one(by_name))
    run(publish_one(tls_settings(broker, ca_file=pki.ca, server_name="localhost")))

    reason = run(refusal(tls_settings(broker, ca_file=pki.ca, server_name="broker.example")))
    print(reason)
    assert reason.startswith(f"TLS: the server certificate of 127.0.0.1:{broker.tls_port} is not valid for ")
    assert "'broker.example'" in reason
    assert "tls.server_name" in reason


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_wrong_ca_says_the_server_certificate_is_not_trusted_by_that_file(
    tls_broker: BrokerFactory, pki: Pki, protocol: str
) -> None:
    broker = tls_broker()
    settings = tls_settings(broker, ca_file=pki.wrong_ca).model_copy(update={"protocol": protocol})
    reason = run(refusal(settings))
    print(reason)
    assert reason.startswith(f"TLS: the server certificate of 127.0.0.1:{broker.tls_port} is not trusted by ")
    assert f"tls.ca_file {pki.wrong_ca}" in reason
    assert "set tls.ca_file to the CA that signed the broker's certificate" in reason


def test_without_ca_file_the_system_cas_do_not_trust_a_private_ca(tls_broker: BrokerFactory) -> None:
    broker = tls_broker()
    reason = run(refusal(MqttSettings(url=broker.tls_url)))
    print(reason)
    assert reason == (
        f"TLS: the server certificate of 127.0.0.1:{broker.tls_port} is not trusted by the system CA certificates "
        "(self-signed certificate in certificate chain); set tls.ca_file to the CA that signed the broker's certificate"
    )


def test_an_expired_server_certificate_says_so_with_our_clock(tls_broker: BrokerFactory, pki: Pki) -> None:
    broker = tls_broker(server=pki.expired_server)
    reason = run(refusal(tls_settings(broker, ca_file=pki.ca)))
    print(reason)
    assert re.fullmatch(
        rf"TLS: the server certificate of 127\.0\.0\.1:{broker.tls_port} has expired "
        r"\(this device's clock says \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\); "
        r"renew the broker's certificate, or fix this device's clock",
        reason,
    ), reason


def test_tls_to_a_plain_port_and_plain_to_a_tls_port_say_so(tls_broker: BrokerFactory, pki: Pki) -> None:
    broker = tls_broker()
    tls_to_plain = MqttSettings(url=f"mqtts://127.0.0.1:{broker.port}", tls=TlsSettings(ca_file=pki.ca))
    reason = run(refusal(tls_to_plain))
    print(reason)
    # mosquitto drops a ClientHello on a plain port as a malformed CONNECT.
    assert reason == (
        f"TLS: 127.0.0.1:{broker.port} closed the connection during the TLS handshake "
        "(is it a TLS port? its log says why)"
    )

    plain_to_tls = MqttSettings(url=f"mqtt://127.0.0.1:{broker.tls_port}")
    reason = run(refusal(plain_to_tls))
    print(reason)
    assert reason.startswith(f"127.0.0.1:{broker.tls_port} closed the connection before answering CONNECT")
    assert reason.endswith("if that port is a TLS listener, use mqtts://")


# --- client certificates ---------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mtls_with_a_good_client_certificate_connects(
    tls_broker: BrokerFactory, pki: Pki, protocol: str, loop: str
) -> None:
    # allow_anonymous is false here: the certificate's CN is our only identity.
    broker = tls_broker(require_certificate=True, use_identity_as_username=True)
    settings = tls_settings(broker, ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    run(publish_one(settings.model_copy(update={"protocol": protocol})), loop)


# With TLS 1.3 the broker judges our certificate after our side of the handshake is
# done: its alert arrives on our first read, or is found when our CONNECT cannot be
# written. Which of the two happens is a race; a few attempts cover both.
ATTEMPTS = 4


@pytest.mark.parametrize("loop", LOOPS)
def test_an_expired_client_certificate_is_reported_as_expired(tls_broker: BrokerFactory, pki: Pki, loop: str) -> None:
    broker = tls_broker(require_certificate=True)
    settings = tls_settings(broker, ca_file=pki.ca, cert_file=pki.expired_client.cert, key_file=pki.expired_client.key)
    for _ in range(ATTEMPTS):
        reason = run(refusal(settings), loop)
        print(reason)
        assert reason == (
            f"TLS: 127.0.0.1:{broker.tls_port} refused our client certificate "
            f"(tls.cert_file {pki.expired_client.cert}): the certificate expired; issue a new one"
        )


def test_a_missing_client_certificate_says_to_set_one(tls_broker: BrokerFactory, pki: Pki) -> None:
    broker = tls_broker(require_certificate=True)
    settings = tls_settings(broker, ca_file=pki.ca)
    for _ in range(ATTEMPTS):
        reason = run(refusal(settings))
        print(reason)
        assert reason == (
            f"TLS: 127.0.0.1:{broker.tls_port} requires a client certificate and we sent none: "
            "set tls.cert_file and tls.key_file"
        )


def test_a_client_certificate_from_another_ca_is_refused(tls_broker: BrokerFactory, pki: Pki) -> None:
    broker = tls_broker(require_certificate=True)
    settings = tls_settings(broker, ca_file=pki.ca, cert_file=pki.foreign_client.cert, key_file=pki.foreign_client.key)
    for _ in range(ATTEMPTS):
        reason = run(refusal(settings))
        print(reason)
        assert reason == (
            f"TLS: 127.0.0.1:{broker.tls_port} refused our client certificate "
            f"(tls.cert_file {pki.foreign_client.cert}): it is not signed by a CA the broker trusts "
            "(the broker's cafile)"
        )


# --- user name and password ------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_password_auth_over_tls(tls_broker: BrokerFactory, pki: Pki, protocol: str) -> None:
    broker = tls_broker(users={USER: PASSWORD})
    base = tls_settings(broker, ca_file=pki.ca).model_copy(update={"protocol": protocol})

    run(publish_one(MqttSettings(**{**dict(base), "username": USER, "password": PASSWORD})))

    # mosquitto 2.0 answers both with "not authorized" (3.1.1 return code 5, v5 reason code 135).
    wrong = run(refusal(MqttSettings(**{**dict(base), "username": USER, "password": "wrong"})))
    print(wrong)
    assert wrong == (
        f"broker refused the connection: bad username or password, or user {USER!r} may not connect (not authorized)"
    )
    unknown = run(refusal(MqttSettings(**{**dict(base), "username": "nobody", "password": PASSWORD})))
    assert unknown.startswith("broker refused the connection: bad username or password, or user 'nobody'")

    anonymous = run(refusal(base))
    print(anonymous)
    assert anonymous == (
        "broker refused the connection: not authorized; the broker requires a username and password (none set)"
    )


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (
            convert_connack_rc_to_reason_code(ConnackCode.CONNACK_REFUSED_BAD_USERNAME_PASSWORD),
            "bad username or password (user 'u')",
        ),
        (ReasonCode(PacketTypes.CONNACK, identifier=134), "bad username or password (user 'u')"),
        (
            convert_connack_rc_to_reason_code(ConnackCode.CONNACK_REFUSED_NOT_AUTHORIZED),
            "bad username or password, or user 'u' may not connect (not authorized)",
        ),
        (
            ReasonCode(PacketTypes.CONNACK, identifier=135),
            "bad username or password, or user 'u' may not connect (not authorized)",
        ),
        (
            convert_connack_rc_to_reason_code(ConnackCode.CONNACK_REFUSED_PROTOCOL_VERSION),
            "it does not support MQTT 3.1.1: set protocol to another version",
        ),
        (ReasonCode(PacketTypes.CONNACK, identifier=137), "server busy (reason code 137)"),
    ],
)
def test_connack_refusals_of_both_protocol_versions_read_the_same(reason: ReasonCode, expected: str) -> None:
    """What mosquitto does not send (3.1.1 code 4, v5 code 134), straight from the codes paho decodes."""
    settings = MqttSettings(username="u", password=PASSWORD)
    assert describe_refusal(reason, settings, "c") == f"broker refused the connection: {expected}"


def test_a_tls_alert_left_unread_is_still_found(tls_broker: BrokerFactory, pki: Pki) -> None:
    """When paho's write of CONNECT fails before it read the broker's alert, the alert is read at close.

    Which comes first in MqttConnection is a race (the tests above mostly see the read);
    here the socket is driven by hand so that the alert is certainly left unread.
    """
    broker = tls_broker(require_certificate=True)
    tls = TlsSettings(ca_file=pki.ca, cert_file=pki.expired_client.cert, key_file=pki.expired_client.key)
    context = build_tls_context(tls)
    with (
        socket.create_connection((LOOPBACK, broker.tls_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=LOOPBACK) as sock,  # TLS 1.3: our side of it completes
    ):
        readable, _, _ = select.select([sock], [], [], 10)
        assert readable, "no alert from mosquitto within 10 s"
        alert = _pending_tls_alert(sock)
    assert alert is not None
    assert alert.reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED"
    assert "the certificate expired" in describe_tls_error(alert, tls, LOOPBACK, broker.tls_port)


# --- MQTT 5 ----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_publish_and_subscribe(tls_broker: BrokerFactory, pki: Pki, protocol: str) -> None:
    broker = tls_broker()
    settings = tls_settings(broker, ca_file=pki.ca).model_copy(update={"protocol": protocol})
    topic = f"fieldlink-sec/{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        conn = MqttConnection(settings, client_id=client_id())
        await conn.open()
        try:
            await conn.subscribe([(f"{topic}/#", 1)])
            await conn.publish(f"{topic}/a", b"one", qos=1)
            conn.publish(f"{topic}/b", b"two", qos=0)
            received = [await conn.messages.get(), await conn.messages.get()]
        finally:
            await conn.close()
        assert sorted((m.topic, m.payload) for m in received) == [(f"{topic}/a", b"one"), (f"{topic}/b", b"two")]

    run(scenario())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_persistent_session_keeps_what_was_published_while_away(mosquitto: Mosquitto, protocol: str) -> None:
    """The cloud's session: clean_session=False and manual acks, under 3.1.1 and 5."""
    settings = MqttSettings(url=mosquitto.url, protocol=protocol)  # type: ignore[arg-type]
    topic = f"fieldlink-sec/{uuid.uuid4().hex[:8]}"
    subscriber_id = client_id()

    async def scenario() -> None:
        first = MqttConnection(settings, client_id=subscriber_id, clean_session=False, manual_ack=True)
        await first.open()
        assert not first.session_present
        await first.subscribe([(topic, 1)])
        await first.close()

        await publish_to(settings, topic, b"while away")

        second = MqttConnection(settings, client_id=subscriber_id, clean_session=False, manual_ack=True)
        await second.open()
        try:
            assert second.session_present
            message = await second.messages.get()
            assert (message.topic, message.payload, message.qos) == (topic, b"while away", 1)
            second.ack(message)
        finally:
            await second.close()

        # A clean session afterwards finds nothing: the flag really reached the broker.
        clean = MqttConnection(settings, client_id=subscriber_id, clean_session=True)
        await clean.open()
        assert not clean.session_present
        await clean.close()

    run(scenario())


async def publish_to(settings: MqttSettings, topic: str, payload: bytes) -> None:
    conn = MqttConnection(settings, client_id=client_id())
    await conn.open()
    try:
        await conn.publish(topic, payload, qos=1)
    finally:
        await conn.close()


@pytest.mark.parametrize(("protocol", "window"), [("3.1.1", 50), ("5", 5)])
def test_mqtt5_keeps_within_the_brokers_receive_maximum(tmp_path: Path, protocol: str, window: int) -> None:
    """mosquitto announces max_inflight_messages as Receive Maximum to v5 clients."""
    broker = Mosquitto(tmp_path / "mosquitto", persistence=False, extra_conf="max_inflight_messages 5")
    broker.start()
    settings = MqttSettings(url=broker.url, protocol=protocol, max_inflight=50)  # type: ignore[arg-type]

    async def scenario() -> None:
        conn = MqttConnection(settings, client_id=client_id())
        assert conn.max_inflight == 50
        await conn.open()
        try:
            assert conn.max_inflight == window
            await asyncio.gather(*(conn.publish("fieldlink-sec/window", b"%d" % i, qos=1) for i in range(200)))
            assert conn.is_open
        finally:
            await conn.close()

    try:
        run(scenario())
    finally:
        broker.stop()


def test_mqtt5_reports_a_publish_the_broker_refused(tls_broker: BrokerFactory, pki: Pki, tmp_path: Path) -> None:
    """MQTT 5 PUBACKs carry a reason code: a refused message must not count as delivered."""
    acl = tmp_path / "acl"
    acl.write_text(f"user {USER}\ntopic write allowed/#\n")
    broker = tls_broker(users={USER: PASSWORD}, extra_conf=f"acl_file {acl}")
    settings = MqttSettings(
        url=broker.tls_url, tls=TlsSettings(ca_file=pki.ca), username=USER, password=PASSWORD, protocol="5"
    )

    async def scenario() -> None:
        conn = MqttConnection(settings, client_id=client_id())
        await conn.open()
        try:
            await conn.publish("allowed/x", b"ok", qos=1)
            with pytest.raises(PublishRefused, match=r"^broker refused the message to denied/x: not authorized$"):
                await conn.publish("denied/x", b"no", qos=1)
            assert conn.is_open
        finally:
            await conn.close()

    run(scenario())


# --- configuration ---------------------------------------------------------------------


class UplinkOnly(Schema):
    uplink: MqttSettings = MqttSettings()


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "uplink.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, UplinkOnly)
    return [line.removeprefix(f"{path}: ") for line in caught.value.lines()]


def test_config_defaults_and_ports(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(
        f'[uplink]\nurl = "mqtts://broker.example"\nprotocol = 5\n'
        f'[uplink.tls]\nca_file = "{pki.ca}"\ncert_file = "{pki.client.cert}"\nkey_file = "{pki.client.key}"\n'
    )
    config = load_config(path, UplinkOnly).uplink
    assert config.protocol == "5"
    assert config.uses_tls
    assert config.address == ("broker.example", 8883)
    assert config.tls == TlsSettings(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key)
    assert parse_broker_url("ssl://h") == ("h", 8883)
    assert parse_broker_url("mqtt://h") == ("h", 1883)
    assert MqttSettings().protocol == "3.1.1"
    assert not MqttSettings().uses_tls


def test_config_problems_name_the_dotted_key(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "nope.pem"
    assert problems(
        tmp_path,
        f'[uplink]\nurl = "mqtts://b"\nprotocol = "4"\n[uplink.tls]\nca_file = "{missing}"\n'
        f'cert_file = "{pki.client.cert}"\nserver_name = "a b"\n',
    ) == [
        "uplink.protocol: must be one of '3.1.1' or '5', got '4'",
        f"uplink.tls.ca_file: cannot read {missing}: No such file or directory",
        "uplink.tls.key_file: required key is missing: cert_file is set, and needs its private key",
        "uplink.tls.server_name: must be a host name or IP address, got 'a b'",
    ]
    assert problems(
        tmp_path,
        f'[uplink]\nurl = "mqtts://b"\n[uplink.tls]\nca_file = "{pki.client.key}"\n'
        f'cert_file = "{pki.client.cert}"\nkey_file = "{pki.server.key}"\n',
    ) == [
        f"uplink.tls.ca_file: {pki.client.key} holds no PEM CA certificate",
        f"uplink.tls.key_file: {pki.server.key} is not the key of cert_file {pki.client.cert}",
    ]
    assert problems(
        tmp_path,
        f'[uplink]\nurl = "mqtts://b"\n[uplink.tls]\n'
        f'cert_file = "{pki.client.cert}"\nkey_file = "{pki.client_key_encrypted}"\n',
    ) == [
        "uplink.tls.key_file: the key is encrypted; give an unencrypted key (protect it with file permissions)",
    ]
    assert problems(tmp_path, f'[uplink]\nurl = "mqtts://b"\n[uplink.tls]\nkey_file = "{pki.client.key}"\n') == [
        "uplink.tls.key_file: cert_file is missing: a client key needs its certificate",
    ]
    assert problems(tmp_path, f'[uplink]\nurl = "mqtt://b:8883"\n[uplink.tls]\nca_file = "{pki.ca}"\n') == [
        "uplink.tls: set, but url 'mqtt://b:8883' is not mqtts:// or ssl://: TLS is chosen by the url",
    ]


def test_the_cloud_broker_section_takes_the_same_keys(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text(
        f'[broker]\nurl = "ssl://broker.example:8884"\nprotocol = "5"\n[broker.tls]\nca_file = "{pki.ca}"\n'
    )
    settings = load_cloud_config(path).broker.effective()
    assert (settings.address, settings.uses_tls, settings.protocol) == (("broker.example", 8884), True, "5")
    assert settings.tls == TlsSettings(ca_file=pki.ca)

    missing = tmp_path / "missing-ca.pem"
    path.write_text(f'[broker]\nurl = "mqtts://b"\n[broker.tls]\nca_file = "{missing}"\n')
    with pytest.raises(ConfigError) as caught:
        load_cloud_config(path)
    assert caught.value.lines() == [f"{path}: broker.tls.ca_file: cannot read {missing}: No such file or directory"]
