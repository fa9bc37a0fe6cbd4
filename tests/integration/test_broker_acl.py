"""The shipped cloud broker config (deploy/mosquitto) on Debian's real mosquitto.

The broker runs the committed files themselves: `fieldlink.conf` as a drop-in under
a main file laid out like Debian's (so a setting that clashes with Debian's main file
fails here too), with only its ports, file paths and certificate locations replaced,
and `fieldlink.acl` as `add-gateway.sh` installs it. Gateways get their passwords
from `add-gateway.sh`, the cloud and dashboard users from `mosquitto_passwd -b`.

Mosquitto drops a denied PUBLISH silently for MQTT 3.1.1 (the PUBACK says nothing),
so "never arrives" is proven with a positive control on the same connection: the
denied messages, then an allowed marker whose PUBACK means the broker has handled
everything before it; then every observer makes a round trip (a SUBSCRIBE, whose
SUBACK the broker sends after anything it already sent that client). MQTT 5 shows
the denial itself: PUBACK reason code 0x87, not authorized.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fieldlink.wire import Topic, TopicKind, decode, decode_state, topic
from tests.rig.certs import CertPair, Pki, _issue, make_pki
from tests.rig.ports import LOOPBACK, free_port, port_accepts
from tests.rig.programs import Programs
from tests.rig.servers import ensure_port_free, require_binary, spawn, stop_process, wait_ready

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "mosquitto"
SHIPPED_CONF = DEPLOY / "fieldlink.conf"
SHIPPED_ACL = DEPLOY / "fieldlink.acl"
ADD_GATEWAY = DEPLOY / "add-gateway.sh"

DEADLINE = 10.0  # any single wait: a CONNACK, a SUBACK, a PUBACK, a message
NOT_AUTHORIZED = 135  # MQTT 5 reason code 0x87
CLOUD_USER, DASHBOARD_USER = "fieldlink-cloud", "dashboard"  # the user blocks of fieldlink.acl
SERVICE_PASSWORD = "not-a-real-password"  # noqa: S105 (a test broker's)


class Gateway(NamedTuple):
    site: str
    id: str

    @property
    def user(self) -> str:
        """The user name convention of fieldlink.acl: the site and the gateway id, as two topic levels."""
        return f"{self.site}/{self.id}"

    def topic(self, kind: TopicKind, device: str | None = None) -> str:
        return topic(kind, self.site, self.id, device)


A = Gateway("plant-a", "gw-01")
B = Gateway("plant-a", "gw-02")  # another gateway of A's site
B_ELSEWHERE = Gateway("plant-b", "gw-01")  # A's gateway id at another site: ids are unique per site only
GATEWAYS = (A, B, B_ELSEWHERE)

Listener = Literal["local", "tls", "mtls"]


# --- the broker, from the committed files ----------------------------------------------


def render_conf(text: str, replacements: dict[str, str]) -> str:
    """`text` with each line equal to a key replaced by its value; every key must occur.

    A line that no longer matches means the shipped file changed: fail, rather than
    test a broker that is not the one shipped.
    """
    used: set[str] = set()
    lines = []
    for line in text.splitlines():
        key = line.strip()
        if key in replacements:
            used.add(key)
        lines.append(replacements.get(key, line))
    missing = sorted(set(replacements) - used)
    assert not missing, f"{SHIPPED_CONF} no longer has these lines; update this test: {missing}"
    production = [line for line in lines if "/etc/" in line and not line.lstrip().startswith("#")]
    assert not production, f"production paths left in the test broker's config: {production}"
    return "\n".join(lines) + "\n"


@dataclass
class DeployedBroker:
    """Debian's mosquitto with deploy/mosquitto/fieldlink.conf in its conf.d."""

    workdir: Path
    pki: Pki
    local_port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    mtls_port: int = field(default_factory=free_port)
    acl_text: str | None = None  # None: the shipped ACL, installed by add-gateway.sh
    passwords: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def passwd(self) -> Path:
        return self.workdir / "fieldlink.passwd"

    @property
    def acl(self) -> Path:
        return self.workdir / "fieldlink.acl"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def port(self, listener: Listener) -> int:
        return {"local": self.local_port, "tls": self.tls_port, "mtls": self.mtls_port}[listener]

    def write_config(self) -> Path:
        conf_d = self.workdir / "conf.d"
        conf_d.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        cert, key, ca = self.pki.server.cert, self.pki.server.key, self.pki.ca
        dropin = render_conf(
            SHIPPED_CONF.read_text(),
            {
                "listener 1883 127.0.0.1": f"listener {self.local_port} {LOOPBACK}",
                "listener 8883": f"listener {self.tls_port} {LOOPBACK}",
                "listener 8884": f"listener {self.mtls_port} {LOOPBACK}",
                "password_file /etc/mosquitto/fieldlink.passwd": f"password_file {self.passwd}",
                "acl_file /etc/mosquitto/fieldlink.acl": f"acl_file {self.acl}",
                "certfile /etc/mosquitto/certs/fieldlink-broker.pem": f"certfile {cert}",
                "keyfile /etc/mosquitto/certs/fieldlink-broker.key": f"keyfile {key}",
                "cafile /etc/mosquitto/ca_certificates/fieldlink-ca.pem": f"cafile {ca}",
            },
        )
        (conf_d / "fieldlink.conf").write_text(dropin)
        main = self.workdir / "mosquitto.conf"
        # Debian's /etc/mosquitto/mosquitto.conf, but logging to stdout (our log file) and
        # without a pid file. `user root`: as root, mosquitto would switch to user
        # mosquitto, which cannot write the test's data folder.
        main.write_text(
            f"persistence true\npersistence_location {data}/\nlog_dest stdout\nuser root\ninclude_dir {conf_d}\n"
        )
        return main

    def provision(self) -> None:
        """The gateways through add-gateway.sh (which installs the ACL), the others as the README says."""
        if self.acl_text is not None:
            self.acl.write_text(self.acl_text)
        for gateway in GATEWAYS:
            self.passwords[gateway.user] = add_gateway(self.passwd, self.acl, gateway.site, gateway.id).stdout.strip()
        tool = require_binary("mosquitto_passwd", "mosquitto")
        for user in (CLOUD_USER, DASHBOARD_USER):
            subprocess.run([tool, "-b", str(self.passwd), user, SERVICE_PASSWORD], check=True, timeout=30)
            self.passwords[user] = SERVICE_PASSWORD

    def start(self) -> None:
        binary = require_binary("mosquitto", "mosquitto")
        main = self.write_config()
        if not self.passwords:
            self.provision()
        ports = [self.local_port, self.tls_port, self.mtls_port]
        for port in ports:
            ensure_port_free("mosquitto", port, self.log_path)
        self._proc = spawn([binary, "-c", str(main)], self.log_path)
        wait_ready(
            "mosquitto", self._proc, lambda: all(port_accepts(LOOPBACK, p) for p in ports), self.log_path, DEADLINE
        )

    def reload(self) -> None:
        """SIGHUP, as `systemctl reload mosquitto` sends: it reads the password and ACL files again."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None


def add_gateway(passwd: Path, acl: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["sh", str(ADD_GATEWAY), "--passwd", str(passwd), "--acl", str(acl), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if check:
        assert done.returncode == 0, f"add-gateway.sh {shlex.join(args)}: {done.returncode}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def gateway_certs(pki: Pki) -> dict[Gateway, CertPair]:
    """Client certificates whose CN is the gateway's user name (openssl wants the "/" escaped)."""
    conf = pki.directory / "ca.cnf"  # the CA's openssl config, written by make_pki
    valid = ("20200101000000Z", "20991231235959Z")
    return {
        gw: _issue(conf, f"{gw.site}-{gw.id}", gw.user.replace("/", "\\/"), "client_ext", *valid)
        for gw in (A, B_ELSEWHERE)
    }


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[DeployedBroker]:
    started = DeployedBroker(tmp_path / "broker", pki)
    started.start()
    yield started
    started.stop()


# --- a synchronous paho client ----------------------------------------------------------


class Client:
    """One paho connection to one listener; every wait is bounded by DEADLINE."""

    def __init__(
        self,
        broker: DeployedBroker,
        user: str | None,
        *,
        password: str | None = None,
        listener: Listener = "tls",
        protocol: Literal["3.1.1", "5"] = "3.1.1",
        cert: CertPair | None = None,
        client_id: str | None = None,
        clean: bool = True,
        port: int | None = None,
    ) -> None:
        """`port` overrides the listener's port (a plain listener elsewhere: the gateway's local broker)."""
        self.broker = broker
        self.port = port if port is not None else broker.port(listener)
        self.protocol = protocol
        self.clean = clean
        version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client_id = client_id or f"acl-{uuid.uuid4().hex[:10]}"
        self._paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=version,
            clean_session=clean if version == mqtt.MQTTv311 else None,
            # A lost connection is a result to assert on, never something to repair.
            reconnect_on_failure=False,
        )
        if listener != "local":
            context = ssl.create_default_context(cafile=str(broker.pki.ca))
            if cert is not None:
                context.load_cert_chain(cert.cert, cert.key)
            self._paho.tls_set_context(context)
        if user is not None:
            self._paho.username_pw_set(user, password if password is not None else broker.passwords.get(user))
        self._changed = threading.Condition()
        self.connack: ReasonCode | None = None
        self.disconnects: list[ReasonCode] = []
        self.error: BaseException | None = None
        self.messages: list[mqtt.MQTTMessage] = []
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self._paho.on_connect = self._on_connect
        self._paho.on_disconnect = self._on_disconnect
        self._paho.on_subscribe = self._on_subscribe
        self._paho.on_publish = self._on_publish
        self._paho.on_message = self._on_message

    # paho callbacks, from its network thread
    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._changed:
            if self.connack is None:
                self.connack = reason
            self._changed.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._changed:
            self.disconnects.append(reason)
            self._changed.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        with self._changed:
            self._subacks[mid] = list(reasons)
            self._changed.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._changed:
            self._pubacks[mid] = reason
            self._changed.notify_all()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def _wait(self, done: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.client_id} on port {self.port}: {what} within {timeout:.0f} s")
                self._changed.wait(remaining)

    def open(self) -> ReasonCode | None:
        """Connect; the CONNACK's reason code, or None when the connection ended without one."""
        try:
            clean_start = {"clean_start": self.clean} if self.protocol == "5" else {}
            self._paho.connect(LOOPBACK, self.port, keepalive=30, **clean_start)
        except (OSError, ssl.SSLError) as exc:  # a TLS refusal may come out of the handshake
            self.error = exc
            return None
        # Until the CONNACK, run paho's loop here: a refused client then has no network
        # thread that would try again (and again) in the background.
        deadline = time.monotonic() + DEADLINE
        while self.connack is None and not self.disconnects:
            if self._paho.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break  # the connection ended: a TLS refusal arrives after our side of the handshake
            assert time.monotonic() < deadline, f"{self.client_id} on port {self.port}: no CONNACK"
        if self.connack is not None and not self.connack.is_failure:
            self._paho.loop_start()
        return self.connack

    def connect(self) -> Client:
        """open(), which must succeed."""
        reason = self.open()
        assert reason is not None, f"no CONNACK: {self.error or self.disconnects}"
        assert not reason.is_failure, f"CONNACK {reason}"
        return self

    @property
    def connected(self) -> bool:
        return self._paho.is_connected()

    def subscribe(self, topic_filter: str, qos: int = 1) -> ReasonCode:
        result, mid = self._paho.subscribe(topic_filter, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(result)
        assert mid is not None
        self._wait(lambda: mid in self._subacks, f"no SUBACK for {topic_filter}")
        (reason,) = self._subacks[mid]
        return reason

    def publish(self, topic_name: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and wait for the PUBACK: the broker has handled the message."""
        info = self._paho.publish(topic_name, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        self._wait(lambda: info.mid in self._pubacks, f"no PUBACK for {topic_name}")
        return self._pubacks[info.mid]

    def sync(self) -> None:
        """A round trip: after it, whatever the broker sent us before has arrived."""
        self.subscribe(f"sync/{uuid.uuid4().hex}")

    def received(self) -> list[tuple[str, bytes]]:
        with self._changed:
            return [(m.topic, bytes(m.payload)) for m in self.messages]

    def wait_for(self, topic_name: str, payload: bytes | None = None) -> mqtt.MQTTMessage:
        def found() -> mqtt.MQTTMessage | None:
            for m in self.messages:
                if m.topic == topic_name and (payload is None or m.payload == payload):
                    return m
            return None

        self._wait(lambda: found() is not None, f"no message on {topic_name}")
        message = found()
        assert message is not None
        return message

    def close(self) -> None:
        self._paho.disconnect()
        self._paho.loop_stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """Makes clients; closes them all at teardown."""
    made: list[Client] = []

    def make(broker: DeployedBroker, user: str | None, **kwargs: Any) -> Client:
        client = Client(broker, user, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


ClientFactory = Callable[..., Client]


def marker() -> bytes:
    return f"marker-{uuid.uuid4().hex}".encode()


def own_topics(gateway: Gateway) -> list[str]:
    """Every topic a gateway publishes on the cloud broker (docs/wire-contract.md)."""
    return [
        gateway.topic(TopicKind.TELEMETRY, "boiler-1"),
        gateway.topic(TopicKind.BATCH),
        gateway.topic(TopicKind.DEVICE_STATUS, "boiler-1"),
        gateway.topic(TopicKind.GATEWAY_STATUS),
        gateway.topic(TopicKind.GATEWAY_HEALTH),
        gateway.topic(TopicKind.COMMAND_RESULT, "boiler-1"),
    ]


def forbidden_for_a() -> list[str]:
    """What gateway A must not publish: other gateways' topics, commands, the cloud's and dashboards' topics."""
    others = [t for gw in (B, B_ELSEWHERE) for t in own_topics(gw)]
    commands = [gw.topic(TopicKind.COMMAND, "boiler-1") for gw in (A, B, B_ELSEWHERE)]
    return [*others, *commands, "dash/plant-a/gw-01/boiler-1/latest", "fl-cloud/cloud-1/health", "unrelated/topic"]


# --- the shipped files --------------------------------------------------------------------


def test_the_shipped_config_keeps_its_deliberate_settings() -> None:
    settings = [line.split(None, 1) for line in SHIPPED_CONF.read_text().splitlines() if line and line[0] != "#"]
    first = dict(settings)  # for the settings that occur once
    assert first["allow_anonymous"] == "false"
    assert first["persistence"] == "true"
    assert first["autosave_interval"] == "1"
    # Mosquitto's 1000 loses QoS 1 messages silently; 0 makes 2.0.11 disconnect a client after a denied publish.
    assert int(first["max_queued_messages"]) >= 1_000_000
    assert int(first["max_packet_size"]) > 1_000_000  # above the cloud's ingest.max_message_bytes
    keys = [key for key, _ in settings]
    # Debian's main file sets it: a second one stops mosquitto. And message_size_limit
    # acknowledges (3.1.1) what it drops.
    assert "persistence_location" not in keys
    assert "message_size_limit" not in keys
    listeners = [value for key, value in settings if key == "listener"]
    assert listeners == ["1883 127.0.0.1", "8883", "8884"]  # plain MQTT on loopback only
    assert keys.count("use_username_as_clientid") == len(listeners)
    assert keys.count("require_certificate") == 2


# --- gateways ----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_gateway_publishes_its_own_topics_and_the_cloud_gets_them(
    broker: DeployedBroker, clients: ClientFactory, protocol: str
) -> None:
    cloud = clients(broker, CLOUD_USER).connect()
    assert not cloud.subscribe("fl/#").is_failure
    gateway = clients(broker, A.user, protocol=protocol).connect()
    sent = [(t, marker()) for t in own_topics(A)]
    for topic_name, payload in sent:
        reason = gateway.publish(topic_name, payload, retain=topic_name.endswith("/status"))
        assert reason.value == 0, f"{topic_name}: {reason}"
    for topic_name, payload in sent:
        cloud.wait_for(topic_name, payload)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_gateway_cannot_publish_as_another_gateway_nor_send_commands(
    broker: DeployedBroker, clients: ClientFactory, protocol: str
) -> None:
    cloud = clients(broker, CLOUD_USER).connect()
    cloud.subscribe("#")  # delivered: what the cloud may read, fl/#
    dashboard = clients(broker, DASHBOARD_USER).connect()
    dashboard.subscribe("#")  # delivered: dash/#
    gateway = clients(broker, A.user, protocol=protocol).connect()

    denied = forbidden_for_a()
    for topic_name in denied:
        reason = gateway.publish(topic_name, b"forged", retain=topic_name.endswith("/status"))
        # MQTT 5 says so in the PUBACK; MQTT 3.1.1 cannot, the PUBACK looks like any other.
        assert reason.value == (NOT_AUTHORIZED if protocol == "5" else 0), f"{topic_name}: {reason}"
    control = marker()
    gateway.publish(A.topic(TopicKind.TELEMETRY, "boiler-1"), control)  # after the denied ones, same connection
    cloud.wait_for(A.topic(TopicKind.TELEMETRY, "boiler-1"), control)
    dashboard.sync()
    cloud.sync()
    assert [t for t, p in cloud.received() if p == b"forged"] == []
    assert dashboard.received() == []

    # Nor was a forged status kept as a retained message: a new subscription would get it now.
    cloud.subscribe("fl/+/+/status")
    cloud.subscribe("fl/+/+/dev/+/status")
    cloud.sync()
    assert [t for t, p in cloud.received() if p == b"forged"] == []


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_gateway_receives_its_own_commands_and_no_one_elses(
    broker: DeployedBroker, clients: ClientFactory, protocol: str
) -> None:
    other = clients(broker, B.user).connect()
    other.publish(B.topic(TopicKind.GATEWAY_STATUS), b'{"state":"online"}', retain=True)  # for A's subscribe

    gateway = clients(broker, A.user, protocol=protocol).connect()
    own = gateway.subscribe(A.topic(TopicKind.COMMAND, "+"))
    assert own.value == 1  # granted, QoS 1
    # Mosquitto 2.0.11 grants a subscription whatever the ACL says and checks read access
    # per message when it delivers (fieldlink.acl says so). Pinned here so that a
    # Mosquitto that refuses at SUBSCRIBE shows up, and the comment can follow it.
    for topic_filter in (B.topic(TopicKind.COMMAND, "+"), B_ELSEWHERE.topic(TopicKind.COMMAND, "+"), "fl/#", "#"):
        assert gateway.subscribe(topic_filter).value == 1, topic_filter

    other.publish(B.topic(TopicKind.TELEMETRY, "boiler-1"), b"b's data")  # acknowledged: already routed
    cloud = clients(broker, CLOUD_USER).connect()
    command = b'{"id":"c-1","tag":"setpoint","value":71.5}'
    for gw in (B, B_ELSEWHERE, A):  # A's last: the positive control
        assert cloud.publish(gw.topic(TopicKind.COMMAND, "boiler-1"), command).value == 0
    gateway.wait_for(A.topic(TopicKind.COMMAND, "boiler-1"), command)
    gateway.sync()
    # Only its own command (once per matching subscription), not B's status, telemetry or commands.
    assert {t for t, _ in gateway.received()} == {A.topic(TopicKind.COMMAND, "boiler-1")}


def test_a_gateway_with_a_client_certificate_is_its_cn(
    broker: DeployedBroker, clients: ClientFactory, gateway_certs: dict[Gateway, CertPair]
) -> None:
    cloud = clients(broker, CLOUD_USER).connect()
    cloud.subscribe("fl/#")
    # No user name, no password: the certificate is the login, its CN the user name.
    gateway = clients(broker, None, listener="mtls", protocol="5", cert=gateway_certs[A]).connect()
    telemetry = A.topic(TopicKind.TELEMETRY, "boiler-1")
    assert gateway.publish(telemetry, b"by certificate").value == 0
    cloud.wait_for(telemetry, b"by certificate")
    assert gateway.publish(B_ELSEWHERE.topic(TopicKind.TELEMETRY, "boiler-1"), b"forged").value == NOT_AUTHORIZED
    assert gateway.subscribe(A.topic(TopicKind.COMMAND, "+")).value == 1
    cloud.publish(A.topic(TopicKind.COMMAND, "boiler-1"), b"cmd")
    gateway.wait_for(A.topic(TopicKind.COMMAND, "boiler-1"), b"cmd")


# --- who may connect --------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest.mark.parametrize("listener", ["tls", "local"])
def test_no_login_without_the_right_password(
    broker: DeployedBroker, clients: ClientFactory, protocol: str, listener: Listener
) -> None:
    # Mosquitto answers all three with "not authorized" (3.1.1 return code 5, MQTT 5 reason code 0x87).
    for user, password in ((None, None), (A.user, "wrong"), ("nobody", SERVICE_PASSWORD), (B.user, "")):
        client = clients(broker, user, password=password, listener=listener, protocol=protocol)
        reason = client.open()
        assert reason is not None, client.error
        assert reason.is_failure, f"{user!r} connected"
        assert reason.value == NOT_AUTHORIZED, f"{user!r}: {reason}"
    assert clients(broker, A.user, listener=listener, protocol=protocol).connect().connected


def test_a_gateway_password_does_not_open_another_gateway(broker: DeployedBroker, clients: ClientFactory) -> None:
    reason = clients(broker, B_ELSEWHERE.user, password=broker.passwords[A.user]).open()
    assert reason is not None
    assert reason.is_failure


def mqtt_connect_packet(client_id: str, user: str, password: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with user name and password, by hand (paho would not send it in clear)."""

    def text(value: str) -> bytes:
        data = value.encode()
        return struct.pack("!H", len(data)) + data

    variable = text("MQTT") + bytes([4, 0b1100_0010]) + struct.pack("!H", 30)
    body = variable + text(client_id) + text(user) + text(password)
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


def test_the_tls_listeners_refuse_plain_mqtt(broker: DeployedBroker) -> None:
    for port in (broker.tls_port, broker.mtls_port):
        with socket.create_connection((LOOPBACK, port), timeout=DEADLINE) as sock:
            sock.sendall(mqtt_connect_packet("plain", A.user, broker.passwords[A.user]))
            answer = b""
            try:
                while chunk := sock.recv(4096):  # until mosquitto closes the connection
                    answer += chunk
            except ConnectionResetError:
                pass
        assert not answer.startswith(b"\x20"), f"port {port} answered a plain CONNECT with a CONNACK"
    # The same bytes on the loopback listener log in: the refusal above is the TLS listener's.
    with socket.create_connection((LOOPBACK, broker.local_port), timeout=DEADLINE) as sock:
        sock.sendall(mqtt_connect_packet("plain", A.user, broker.passwords[A.user]))
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted


def test_client_certificates_must_come_from_the_ca(
    broker: DeployedBroker, clients: ClientFactory, pki: Pki, gateway_certs: dict[Gateway, CertPair]
) -> None:
    # With TLS 1.3 the refusal of a certificate arrives after the client's side of the
    # handshake: as an error of connect() or as a lost connection without a CONNACK.
    foreign = clients(broker, None, listener="mtls", cert=pki.foreign_client)
    assert foreign.open() is None, f"a certificate of another CA connected: {foreign.connack}"
    missing = clients(broker, A.user, listener="mtls")  # a password is no way in on this listener
    assert missing.open() is None, f"no certificate, yet connected: {missing.connack}"
    expired = clients(broker, None, listener="mtls", cert=pki.expired_client)
    assert expired.open() is None, f"an expired certificate connected: {expired.connack}"
    # A good certificate on the password listener proves nothing there: it still needs a password.
    no_password = clients(broker, None, listener="tls", cert=gateway_certs[A])
    reason = no_password.open()
    assert reason is not None
    assert reason.is_failure


def test_one_connection_per_user_so_no_one_takes_over_a_session(broker: DeployedBroker, clients: ClientFactory) -> None:
    """use_username_as_clientid: a client id chosen by a gateway cannot name another's session."""
    cloud = clients(broker, CLOUD_USER, client_id="fieldlink-cloud-cloud-1", clean=False).connect()
    cloud.subscribe("fl/#")
    other = clients(broker, B.user, client_id="fieldlink-plant-a-gw-02").connect()
    # Gateway A connects with the cloud's client id, then with B's, each with a clean session.
    for victim_id in ("fieldlink-cloud-cloud-1", "fieldlink-plant-a-gw-02"):
        clients(broker, A.user, client_id=victim_id).connect().close()
    control = marker()
    other.publish(B.topic(TopicKind.TELEMETRY, "boiler-1"), control)
    cloud.wait_for(B.topic(TopicKind.TELEMETRY, "boiler-1"), control)
    assert cloud.connected
    assert other.connected
    assert (cloud.disconnects, other.disconnects) == ([], [])


# --- dashboards --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_dashboard_reads_dash_only_and_sends_no_commands(
    broker: DeployedBroker, clients: ClientFactory, protocol: str
) -> None:
    cloud = clients(broker, CLOUD_USER).connect()
    latest = b'{"site":"plant-a","gateway":"gw-01","device":"boiler-1","values":{}}'
    cloud.publish("dash/plant-a/gw-01/boiler-1/latest", latest, retain=True)
    gateway = clients(broker, A.user).connect()
    gateway.subscribe(A.topic(TopicKind.COMMAND, "+"))
    gateway.publish(A.topic(TopicKind.TELEMETRY, "boiler-1"), b"raw envelope")

    dashboard = clients(broker, DASHBOARD_USER, protocol=protocol).connect()
    dashboard.subscribe("#")
    dashboard.wait_for("dash/plant-a/gw-01/boiler-1/latest", latest)
    command = A.topic(TopicKind.COMMAND, "boiler-1")
    reason = dashboard.publish(command, b'{"tag":"setpoint","value":1}')
    assert reason.value == (NOT_AUTHORIZED if protocol == "5" else 0)
    reason = dashboard.publish("dash/plant-a/gw-01/boiler-1/latest", b"forged", retain=True)
    assert reason.value == (NOT_AUTHORIZED if protocol == "5" else 0)
    gateway.sync()
    dashboard.sync()
    assert gateway.received() == []
    assert dashboard.received() == [("dash/plant-a/gw-01/boiler-1/latest", latest)]


# --- add-gateway.sh -------------------------------------------------------------------------


def test_add_gateway_is_idempotent_and_a_reload_lets_the_new_gateway_in(
    broker: DeployedBroker, clients: ClientFactory
) -> None:
    assert broker.acl.read_text() == SHIPPED_ACL.read_text()  # installed unchanged
    before = broker.passwd.read_bytes()
    again = add_gateway(broker.passwd, broker.acl, A.site, A.id)
    assert again.stdout == ""
    assert "already in" in again.stderr
    assert broker.passwd.read_bytes() == before
    assert broker.passwd.stat().st_mode & 0o777 == 0o640

    connected = clients(broker, A.user).connect()  # logged in with the password about to be replaced
    newcomer = Gateway("plant-c", "gw-01")
    password = add_gateway(broker.passwd, broker.acl, newcomer.site, newcomer.id).stdout.strip()
    assert len(password) == 32
    rotated = add_gateway(broker.passwd, broker.acl, "--rotate", A.site, A.id).stdout.strip()
    assert rotated not in ("", broker.passwords[A.user])
    broker.reload()

    def logs_in(user: str, secret: str) -> bool:
        reason = clients(broker, user, password=secret).open()
        return reason is not None and not reason.is_failure

    # Mosquitto reloads after the signal, in its own time: poll with a deadline.
    deadline = time.monotonic() + DEADLINE
    while not (logs_in(newcomer.user, password) and not logs_in(A.user, broker.passwords[A.user])):
        assert time.monotonic() < deadline, "the reload did not take the new passwords"
        time.sleep(0.1)
    assert logs_in(A.user, rotated)
    # The reload also cut the connection made with the old password: a rotation (or a
    # removal) takes effect at once, not at the gateway's next reconnect.
    while connected.connected:
        assert time.monotonic() < deadline, "the connection with the old password outlived the reload"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("site", "gateway", "problem"),
    [
        ("plant/a", "gw-01", "site must not contain '/', '+' or '#', got 'plant/a'"),
        ("plant-a", "gw+1", "gateway must not contain '/', '+' or '#', got 'gw+1'"),
        ("$SYS", "gw-01", "site must not start with '$', got '$SYS'"),
        ("plant:a", "gw-01", "site must not contain ':' (the password file's separator), got 'plant:a'"),
        ("plant-a", "", "gateway must not be empty"),
    ],
)
def test_add_gateway_refuses_names_that_are_not_one_topic_level(
    tmp_path: Path, site: str, gateway: str, problem: str
) -> None:
    passwd = tmp_path / "fieldlink.passwd"
    done = add_gateway(passwd, tmp_path / "fieldlink.acl", "--", site, gateway, check=False)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip().splitlines()[-1] == f"add-gateway: {problem}"
    assert not passwd.exists()


# --- topic prefix ------------------------------------------------------------------------------


def documented_prefix_command() -> str:
    """The sed command that fieldlink.acl gives for a topic prefix, as written there."""
    (line,) = [line for line in SHIPPED_ACL.read_text().splitlines() if line.lstrip("# ").startswith("sed -i")]
    return line.lstrip("# ")


@pytest.fixture
def prefixed_broker(tmp_path: Path, pki: Pki) -> Iterator[DeployedBroker]:
    """The shipped ACL after the command it documents for topic_prefix = "tenant-a"."""
    acl = tmp_path / "fieldlink.acl"
    acl.write_text(SHIPPED_ACL.read_text())
    command = documented_prefix_command().replace("/etc/mosquitto/fieldlink.acl", shlex.quote(str(acl)))
    subprocess.run(["sh", "-c", command], check=True, timeout=30)
    assert acl.read_text() != SHIPPED_ACL.read_text()
    started = DeployedBroker(tmp_path / "broker", pki, acl_text=acl.read_text())
    started.start()
    yield started
    started.stop()


def test_the_documented_prefix_command_moves_the_tree_under_the_prefix(
    prefixed_broker: DeployedBroker, clients: ClientFactory
) -> None:
    cloud = clients(prefixed_broker, CLOUD_USER, protocol="5").connect()
    cloud.subscribe("#")
    gateway = clients(prefixed_broker, A.user, protocol="5").connect()
    gateway.subscribe(f"tenant-a/{A.topic(TopicKind.COMMAND, '+')}")
    for topic_name in own_topics(A):
        assert gateway.publish(f"tenant-a/{topic_name}", b"prefixed").value == 0
        assert gateway.publish(topic_name, b"outside").value == NOT_AUTHORIZED
        cloud.wait_for(f"tenant-a/{topic_name}", b"prefixed")
    command = f"tenant-a/{A.topic(TopicKind.COMMAND, 'boiler-1')}"
    assert cloud.publish(command, b"cmd").value == 0
    gateway.wait_for(command, b"cmd")
    assert cloud.publish(A.topic(TopicKind.COMMAND, "boiler-1"), b"cmd").value == NOT_AUTHORIZED
    # dash/ and fl-cloud/ stay unprefixed (docs/wire-contract.md#topic-prefix).
    assert cloud.publish("dash/plant-a/summary", b"{}").value == 0
    assert cloud.publish("fl-cloud/cloud-1/health", b"{}").value == 0


# --- the real gateway and cloud on this broker ------------------------------------------------


def gateway_config(broker: DeployedBroker, state: Path, local_port: int, password_file: Path) -> str:
    return f"""
[gateway]
site = "{A.site}"
id = "{A.id}"
state_dir = "{state}"
health_interval = "250ms"
[local_broker]
bind = "{LOOPBACK}:{local_port}"
[uplink]
url = "mqtts://{LOOPBACK}:{broker.tls_port}"
username = "{A.user}"
password_file = "{password_file}"
encoding = "json"
reconnect_min = "100ms"
reconnect_max = "500ms"
[uplink.tls]
ca_file = "{broker.pki.ca}"
"""


def cloud_config(broker: DeployedBroker, state: Path, password_file: Path) -> str:
    return f"""
[cloud]
name = "cloud-1"
state_dir = "{state}"
health_interval = "250ms"
[broker]
url = "mqtts://{LOOPBACK}:{broker.tls_port}"
username = "{CLOUD_USER}"
password_file = "{password_file}"
[broker.tls]
ca_file = "{broker.pki.ca}"
[store]
kind = "sqlite"
"""


def local_record(device: str, value: float) -> bytes:
    """A record envelope as a local application publishes it to the gateway (docs/wire-contract.md)."""
    envelope = {
        "ver": 1,
        "kind": "record",
        "site": A.site,
        "gw": A.id,
        "dev": device,
        "seq": 0,
        "ts": time.time_ns() // 1_000_000,
        "vals": {"humidity": {"t": "float", "v": value, "u": "%"}},
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def record_values(message: mqtt.MQTTMessage) -> list[object]:
    """The humidity of every record in a telemetry or batch message."""
    return [r.values["humidity"].value for r in decode(bytes(message.payload))]


def test_the_real_gateway_and_cloud_work_through_the_shipped_acl(
    broker: DeployedBroker, clients: ClientFactory, programs: Programs, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "gateway").write_text(broker.passwords[A.user] + "\n")
    (secrets / "cloud").write_text(SERVICE_PASSWORD + "\n")
    local_port = free_port()
    gateway = programs.gateway(gateway_config(broker, tmp_path / "gateway", local_port, secrets / "gateway"))
    status, device = A.topic(TopicKind.GATEWAY_STATUS), "lab-sensor"

    # 1. The gateway's side of the ACL, watched with the cloud's credentials.
    watcher = clients(broker, CLOUD_USER).connect()
    watcher.subscribe("fl/#")
    gateway.start().wait_port(local_port)
    online = watcher.wait_for(status)  # published after its command subscription
    assert decode_state(bytes(online.payload))["state"] == "online"
    watcher.wait_for(A.topic(TopicKind.GATEWAY_HEALTH))

    local = clients(broker, None, listener="local", port=local_port).connect()  # the gateway's embedded broker
    command_topic = A.topic(TopicKind.COMMAND, device)  # not a device of a gateway source: relayed locally
    local.subscribe(command_topic)
    local.publish(A.topic(TopicKind.TELEMETRY, device), local_record(device, 41.5))

    def forwarded(value: float) -> bool:
        data = {A.topic(TopicKind.TELEMETRY, device), A.topic(TopicKind.BATCH)}
        return any(m.topic in data and value in record_values(m) for m in watcher.messages)

    deadline = time.monotonic() + DEADLINE
    while not forwarded(41.5):
        assert time.monotonic() < deadline, f"the record did not reach the cloud broker: {watcher.received()}"
        time.sleep(0.05)
    command = b'{"id":"c-1","tag":"setpoint","value":71.5}'
    watcher.publish(command_topic, command)
    local.wait_for(command_topic, command)
    watcher.close()  # the real cloud takes the user over: one connection per user

    # 2. The cloud's side: it subscribes, stores and republishes on dash/ for the dashboard.
    dashboard = clients(broker, DASHBOARD_USER).connect()
    dashboard.subscribe("dash/#")
    cloud = programs.cloud(cloud_config(broker, tmp_path / "cloud", secrets / "cloud"))
    cloud.start()
    dash_status = f"dash/{A.site}/{A.id}/status"
    assert json.loads(dashboard.wait_for(dash_status).payload)["state"] == "online"  # from the retained status
    local.publish(A.topic(TopicKind.TELEMETRY, device), local_record(device, 42.5))
    dash_telemetry = f"dash/{A.site}/{A.id}/{device}/telemetry"
    deadline = time.monotonic() + DEADLINE
    while not any(
        m.topic == dash_telemetry and json.loads(m.payload)["values"]["humidity"]["value"] == 42.5
        for m in dashboard.messages
    ):
        assert time.monotonic() < deadline, f"no dashboard telemetry: {dashboard.received()}"
        time.sleep(0.05)

    # 3. The last will (the gateway's own status topic) passes the ACL too.
    gateway.kill()
    deadline = time.monotonic() + DEADLINE
    while not any(m.topic == dash_status and json.loads(m.payload)["state"] == "offline" for m in dashboard.messages):
        assert time.monotonic() < deadline, f"no offline status after the kill: {dashboard.received()}"
        time.sleep(0.05)
    assert cloud.stop() == 0
    for program in (gateway, cloud):
        log = program.log()
        for refusal in ("refused", "not authorized", "no commands from the cloud", "unreachable"):
            assert refusal not in log, f"{program.name}: {refusal!r} in its log:\n{log}"


def test_topic_of_every_kind_a_gateway_publishes_is_covered() -> None:
    """own_topics() lists every kind the wire contract lets a gateway publish on the cloud broker."""
    published = {Topic.parse(t).kind for t in own_topics(A)}
    assert published == set(TopicKind) - {TopicKind.COMMAND}
