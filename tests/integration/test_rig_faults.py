"""The fault-injection rig: the TCP fault proxy and the size-capped file system."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.rig import LOOPBACK, Mosquitto, MqttProbe, free_port
from tests.rig.proxy import CHUNK, HOLD_LIMIT, FaultProxy
from tests.rig.smallfs import (
    MountNotPermitted,
    fill,
    free_bytes,
    require_small_filesystem,
    skip_or_fail_mount,
    small_filesystem,
)

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534
# An absent answer is asserted by waiting this long for it; everything else waits on events.
SILENCE = 0.5
CONNACK_OK = b"\x20\x02\x00\x00"
# Far more than the socket buffers of a loopback connection can take (a few MiB each way).
TOO_MUCH = 256 * 1024 * 1024


# --- helpers -------------------------------------------------------------------------------


class EchoServer:
    """A threaded TCP echo server that records how each connection ended: "eof" or "reset"."""

    def __init__(self) -> None:
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self.endings: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._accept, name="echo-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # close() shut the listener down
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(CHUNK):
                    conn.sendall(data)
            except ConnectionResetError:
                self.endings.put("reset")
            except OSError as exc:
                self.endings.put(repr(exc))
            else:
                self.endings.put("eof")

    def ending(self, timeout: float = 5.0) -> str:
        return self.endings.get(timeout=timeout)

    def close(self) -> None:
        # On Linux, close() alone does not wake a thread blocked in accept(); shutdown() does.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def echo_proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(LOOPBACK, echo.port) as proxy:
        yield proxy


def connect(port: int) -> socket.socket:
    return socket.create_connection((LOOPBACK, port), timeout=5)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def mqtt_connect_packet(client_id: str) -> bytes:
    """A raw MQTT 3.1.1 CONNECT, clean session, keepalive 60 s."""
    ident = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(ident).to_bytes(2, "big") + ident
    return bytes([0x10, len(body)]) + body


def mqtt_handshake(port: int) -> socket.socket:
    """Open a raw MQTT connection to `port` and return it once CONNACK (accepted) arrived."""
    sock = connect(port)
    sock.sendall(mqtt_connect_packet(f"raw-{uuid.uuid4().hex[:8]}"))
    assert recv_exactly(sock, 4) == CONNACK_OK
    return sock


def unique_topic() -> str:
    return f"fieldlink-faults/{uuid.uuid4().hex[:12]}"


@contextmanager
def paho_client(port: int) -> Iterator[mqtt.Client]:
    """A connected paho client (network loop in its own thread), disconnected on exit."""
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"faults-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda *_args: connected.set()
    client.connect(LOOPBACK, port, keepalive=60)
    client.loop_start()
    try:
        assert connected.wait(5), "no CONNACK through the proxy"
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


# --- the fault proxy against an echo server ------------------------------------------------


def test_proxy_forwards_both_ways_in_order(echo: EchoServer, echo_proxy: FaultProxy) -> None:
    payload = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB, not one repeated byte
    with connect(echo_proxy.port) as sock:
        # Send from a thread: with 1 MiB in flight, writing before reading would deadlock.
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = recv_exactly(sock, len(payload))
        sender.join()
        assert echoed == payload
        assert echo_proxy.accepted == 1
        assert echo_proxy.open_connections == 1
        assert echo_proxy.bytes_up == echo_proxy.bytes_down == len(payload)
    # A FIN from the client reaches the server, whose FIN closes the link.
    assert echo.ending() == "eof"
    echo_proxy.wait_until(lambda: echo_proxy.open_connections == 0, what="link closed")
    assert echo_proxy.url == f"mqtt://127.0.0.1:{echo_proxy.port}"


def test_stall_holds_bytes_on_an_open_connection_and_pass_delivers_them(
    echo: EchoServer, echo_proxy: FaultProxy
) -> None:
    with connect(echo_proxy.port) as sock:
        assert roundtrip(sock, b"before") == b"before"
        echo_proxy.stall()
        sock.sendall(b"x" * 1000)
        echo_proxy.wait_until(lambda: echo_proxy.held_bytes == 1000, what="1000 bytes held")
        assert echo_proxy.bytes_up == 6
        sock.settimeout(SILENCE)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert echo_proxy.open_connections == 1
        assert echo.endings.empty()

        echo_proxy.pass_()
        sock.settimeout(5)
        assert recv_exactly(sock, 1000) == b"x" * 1000
        assert echo_proxy.held_bytes == 0
        assert echo_proxy.bytes_up == echo_proxy.bytes_down == 1006


def test_stall_stops_reading_once_it_holds_enough(echo: EchoServer, echo_proxy: FaultProxy) -> None:
    """A writer on a dead link ends up blocked, as when the peer never acknowledges."""
    with connect(echo_proxy.port) as sock:
        assert roundtrip(sock, b"up") == b"up"
        echo_proxy.stall()
        # Send until no byte goes out for SILENCE seconds (or far more than any socket buffers).
        sock.settimeout(SILENCE)
        block = b"y" * CHUNK
        sent = 0
        with contextlib.suppress(TimeoutError):
            while sent < TOO_MUCH:
                sent += sock.send(block)
        assert sent < TOO_MUCH
        # Had the send only paused, the proxy reads on up to its limit; it never holds much more.
        echo_proxy.wait_until(lambda: echo_proxy.held_bytes >= HOLD_LIMIT, what="the hold limit")
        assert echo_proxy.held_bytes <= HOLD_LIMIT + CHUNK

        echo_proxy.pass_()
        sock.settimeout(5)
        assert recv_exactly(sock, sent) == b"y" * sent
        assert echo_proxy.bytes_up == 2 + sent


def test_stall_accepts_new_connections_the_upstream_never_sees(echo: EchoServer, echo_proxy: FaultProxy) -> None:
    echo_proxy.stall()
    with connect(echo_proxy.port) as given_up:
        given_up.sendall(b"lost")
        echo_proxy.wait_until(lambda: echo_proxy.held_bytes == 4, what="4 bytes held")
    # Closed during the stall: the proxy drops it and will never replay it upstream.
    echo_proxy.wait_until(lambda: echo_proxy.open_connections == 0, what="abandoned link dropped")
    assert echo_proxy.held_bytes == 0

    with connect(echo_proxy.port) as sock:
        sock.sendall(b"ping")
        echo_proxy.wait_until(lambda: echo_proxy.held_bytes == 4, what="4 bytes held")
        assert echo_proxy.accepted == 2
        assert echo.accepted == 0

        echo_proxy.pass_()
        assert recv_exactly(sock, 4) == b"ping"
        assert echo.accepted == 1
        assert echo_proxy.bytes_up == 4


def test_cut_resets_both_sides_and_new_connections_still_pass(echo: EchoServer, echo_proxy: FaultProxy) -> None:
    with connect(echo_proxy.port) as sock:
        assert roundtrip(sock, b"hello") == b"hello"
        echo_proxy.cut()
        assert echo_proxy.open_connections == 0
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    assert echo.ending() == "reset"

    # cut() is an event, not a mode: the proxy still passes new connections.
    with connect(echo_proxy.port) as sock:
        assert roundtrip(sock, b"again") == b"again"
    assert echo_proxy.accepted == 2


def test_refuse_fails_new_connections_and_pass_listens_again(echo: EchoServer, echo_proxy: FaultProxy) -> None:
    with connect(echo_proxy.port) as before:
        # A connection the proxy had not accepted yet would be reset by refuse().
        echo_proxy.wait_connections(1)
        echo_proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            connect(echo_proxy.port)
        # Open connections are not the listener's business: this one still works.
        assert roundtrip(before, b"still") == b"still"
        assert echo_proxy.accepted == 1

        echo_proxy.pass_()
        with connect(echo_proxy.port) as after:
            assert roundtrip(after, b"back") == b"back"
    assert echo_proxy.accepted == 2


def test_a_dead_upstream_resets_the_client() -> None:
    with FaultProxy(LOOPBACK, free_port()) as proxy:
        # The reset can come before connect() returns or after: both are a reset.
        with pytest.raises(ConnectionResetError), connect(proxy.port) as sock:
            sock.recv(1)
        proxy.wait_until(lambda: proxy.open_connections == 0, what="link dropped")
        assert proxy.accepted == 1


def test_wait_connections_times_out_with_the_counters(echo_proxy: FaultProxy) -> None:
    with pytest.raises(TimeoutError, match=r"accepted=0.*: 1 accepted connections not reached"):
        echo_proxy.wait_connections(1, timeout=0.1)
    with connect(echo_proxy.port):
        echo_proxy.wait_connections(1, timeout=5)


def test_stop_resets_connections_and_start_listens_again(echo: EchoServer) -> None:
    proxy = FaultProxy(LOOPBACK, echo.port)
    proxy.start()
    try:
        with connect(proxy.port) as sock:
            proxy.stop()
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        with pytest.raises(ConnectionRefusedError):
            connect(proxy.port)
        proxy.start()
        with connect(proxy.port) as sock:
            assert roundtrip(sock, b"restarted") == b"restarted"
    finally:
        proxy.stop()


def test_start_on_a_taken_port_fails_and_leaves_no_thread(echo: EchoServer) -> None:
    proxy = FaultProxy(LOOPBACK, echo.port, listen_port=echo.port)
    with pytest.raises(OSError, match="Address already in use"):
        proxy.start()
    assert f"fault-proxy-{echo.port}" not in [thread.name for thread in threading.enumerate()]
    proxy.stop()  # a no-op, not an error


# --- the fault proxy in front of mosquitto -------------------------------------------------


@pytest.fixture
def broker_proxy(mosquitto: Mosquitto) -> Iterator[FaultProxy]:
    with FaultProxy(mosquitto.host, mosquitto.port) as proxy:
        yield proxy


def test_mqtt_publish_through_the_proxy(mosquitto: Mosquitto, broker_proxy: FaultProxy) -> None:
    topic = unique_topic()
    with MqttProbe(mosquitto.host, mosquitto.port, [topic]) as probe, paho_client(broker_proxy.port) as client:
        info = client.publish(topic, b"via proxy", qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
        assert [m.payload for m in probe.wait_for(1, timeout=5)] == [b"via proxy"]
    assert broker_proxy.accepted == 1


def test_mqtt_publish_in_a_stall_gets_no_answer_until_the_link_passes(
    mosquitto: Mosquitto, broker_proxy: FaultProxy
) -> None:
    topic = unique_topic()
    with MqttProbe(mosquitto.host, mosquitto.port, [topic]) as probe, paho_client(broker_proxy.port) as client:
        broker_proxy.stall()
        up_before = broker_proxy.bytes_up
        info = client.publish(topic, b"stalled", qos=1)
        broker_proxy.wait_until(lambda: broker_proxy.held_bytes > 0, what="the PUBLISH held")

        info.wait_for_publish(timeout=SILENCE)
        assert not info.is_published()
        assert client.is_connected()
        assert broker_proxy.open_connections == 1
        assert broker_proxy.bytes_up == up_before
        assert probe.messages == []

        broker_proxy.pass_()
        info.wait_for_publish(timeout=5)
        assert info.is_published()
        assert [m.payload for m in probe.wait_for(1, timeout=5)] == [b"stalled"]


def test_mqtt_cut_closes_the_client_and_pass_lets_a_new_connection_through(broker_proxy: FaultProxy) -> None:
    with mqtt_handshake(broker_proxy.port) as sock:
        broker_proxy.stall()
        broker_proxy.cut()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    assert broker_proxy.open_connections == 0

    broker_proxy.pass_()
    with mqtt_handshake(broker_proxy.port):
        assert broker_proxy.accepted == 2


def test_mqtt_refuse_fails_the_connect(broker_proxy: FaultProxy) -> None:
    broker_proxy.refuse()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"faults-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConnectionRefusedError):
        client.connect(LOOPBACK, broker_proxy.port)
    assert broker_proxy.accepted == 0


# --- the small file system -----------------------------------------------------------------


def mount_source(path: Path) -> str | None:
    """The source ("device") of the mount at `path` per /proc/self/mounts, None if not a mount point."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, target, *_ = line.split()
        if target == str(path):
            return source
    return None


def test_small_filesystem_mounts_a_capped_tmpfs_and_unmounts_it(tmp_path: Path) -> None:
    path = tmp_path / "small"
    with require_small_filesystem(path, 1 << 20) as mounted:
        assert mounted == path
        assert os.path.ismount(path)
        assert mount_source(path) == "fieldlink-smallfs"
        st = os.statvfs(path)
        assert st.f_blocks * st.f_frsize == 1 << 20
        assert free_bytes(path) == 1 << 20
        (path / "data").write_bytes(b"d" * 4096)
        assert free_bytes(path) == (1 << 20) - 4096
    assert not os.path.ismount(path)
    assert mount_source(path) is None
    assert list(path.iterdir()) == []  # the file lived in the tmpfs


def test_writing_past_the_size_fails_with_enospc(tmp_path: Path) -> None:
    with require_small_filesystem(tmp_path / "small", 256 * 1024) as path:
        with pytest.raises(OSError, match="No space left on device") as excinfo:
            (path / "big").write_bytes(b"z" * (512 * 1024))
        assert excinfo.value.errno == errno.ENOSPC
        assert free_bytes(path) == 0


def test_fill_leaves_about_the_requested_space(tmp_path: Path) -> None:
    with require_small_filesystem(tmp_path / "small", 1 << 20) as path:
        filler = fill(path, 64 * 1024 + 100)
        assert filler.parent == path
        free = free_bytes(path)
        assert 64 * 1024 + 100 <= free < 64 * 1024 + 100 + os.statvfs(path).f_frsize

        (path / "fits").write_bytes(b"f" * free)
        with pytest.raises(OSError, match="No space left on device") as excinfo:
            (path / "does-not-fit").write_bytes(b"n")
        assert excinfo.value.errno == errno.ENOSPC

        filler.unlink()  # "the operator cleaned up"
        assert free_bytes(path) == (1 << 20) - free
        with pytest.raises(ValueError, match="cannot leave"):
            fill(path, 2 << 20)


def test_a_busy_filesystem_is_unmounted_lazily(tmp_path: Path) -> None:
    path = tmp_path / "small"
    with ExitStack() as keep_open:
        with require_small_filesystem(path, 1 << 20):
            held = keep_open.enter_context((path / "held").open("w+b"))
        assert not os.path.ismount(path)
        # The detached file system lives on for whoever still uses it.
        held.write(b"still here")
        held.seek(0)
        assert held.read() == b"still here"
    assert not (path / "held").exists()


def mount_as_nobody() -> str:
    """Try `small_filesystem` in a forked child that dropped root; return what it reports.

    A fork, not a subprocess: the venv's Python lives under /root (mode 0700), which
    an unprivileged user cannot execute.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        report = "no report"
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            workdir = tempfile.mkdtemp(dir="/tmp")
            try:
                with small_filesystem(Path(workdir) / "small", 65536):
                    report = "mounted as an unprivileged user"
            except MountNotPermitted as exc:
                report = f"MountNotPermitted: {exc}"
            finally:
                shutil.rmtree(workdir)
        except BaseException as exc:
            report = f"child failed: {exc!r}"
        finally:
            os.write(write_fd, report.encode())
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read().decode()
    os.waitpid(pid, 0)
    return report


def test_mounting_without_root_says_why() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    report = mount_as_nobody()
    assert report.startswith("MountNotPermitted: "), report
    assert f"it needs root with CAP_SYS_ADMIN, we run as uid {NOBODY}" in report
    assert "[Errno 1] Operation not permitted" in report


def test_an_unpermitted_mount_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        skip_or_fail_mount(MountNotPermitted("needs root", errno.EPERM))


def test_an_unpermitted_mount_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        skip_or_fail_mount(MountNotPermitted("needs root", errno.EPERM))
