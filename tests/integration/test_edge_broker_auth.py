"""The gateway's local broker with logins and topic rules, against a real gateway process.

paho clients log in (or fail to) on the embedded amqtt broker: no credentials, a wrong
password and an unknown user are refused at CONNECT; a logged-in user publishes and
subscribes only within its rules. amqtt drops a refused publish without a word (MQTT
3.1.1 has no way to say no), so non-arrival is asserted behind a marker message the
same client sends right after it, on the same connection, which does arrive.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt import publish
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fieldlink.broker_auth import set_password
from tests.integration.fleet import GATEWAY, SITE, gateway_toml, with_keys
from tests.rig import LOOPBACK, MqttProbe, free_port
from tests.rig.programs import BIN, Programs

pytestmark = pytest.mark.timeout(90)

BASE = f"fl/{SITE}/{GATEWAY}"
PASSWORDS = {"hmi": "panel-2 secret", "viewer": "look only"}
# hmi may command and watch this gateway; viewer may watch its health and talk on lab/.
ACL = f"""
[local_broker.acl.hmi]
publish = ["{BASE}/dev/+/cmd"]
subscribe = ["{BASE}/#", "lab/#"]
[local_broker.acl.viewer]
publish = ["lab/#"]
subscribe = ["{BASE}/health", "lab/+"]
"""


class LoginProbe(MqttProbe):
    """The rig's probe, logged in (it connects anonymously otherwise)."""

    def __init__(self, port: int, topics: list[str], user: str, password: str) -> None:
        super().__init__(LOOPBACK, port, topics)
        self._client.username_pw_set(user, password)


def connack(port: int, user: str | None = None, password: str | None = None, client_id: str = "") -> ReasonCode:
    """The broker's answer to one CONNECT."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"login-{uuid.uuid4().hex[:8]}")
    if user is not None:
        client.username_pw_set(user, password)
    answers: list[ReasonCode] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: answers.append(reason)
    client.connect(LOOPBACK, port)
    deadline = time.monotonic() + 10
    try:
        while not answers and time.monotonic() < deadline:
            client.loop(timeout=0.05)  # in this thread: no network thread to stop (that takes a second)
    finally:
        client.disconnect()
    assert answers, "no CONNACK within 10 s"
    return answers[0]


def write_users(path: Path) -> None:
    """Through `fieldlink-gateway passwd`, as an operator would."""
    for user, password in PASSWORDS.items():
        done = subprocess.run(
            [str(BIN / "fieldlink-gateway"), "passwd", str(path), user, "--password-stdin"],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert f"added {user!r}" in done.stdout


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fieldlink-gateway"), "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_logins_and_topic_rules(programs: Programs, tmp_path: Path) -> None:
    users = tmp_path / "local-users"
    write_users(users)
    assert stat.S_IMODE(users.stat().st_mode) == 0o600  # hashes are not for everyone's eyes
    assert all(line.split(":", 1)[1].startswith("$argon2id$") for line in users.read_text().splitlines())

    local_port = free_port()
    nowhere = f"mqtt://{LOOPBACK}:{free_port()}"  # no cloud: this test is about the local side
    config = gateway_toml(tmp_path / "gateway", local_port, nowhere, sources="")
    config = with_keys(config, "local_broker", f'users_file = "{users}"') + ACL
    gateway = programs.gateway(config)
    gateway.start().wait_port(local_port)

    # Logins: only known users with their password get in.
    assert connack(local_port).is_failure
    assert connack(local_port, "hmi", "wrong").is_failure
    assert connack(local_port, "mallory", "panel-2 secret").is_failure
    assert not connack(local_port, "hmi", PASSWORDS["hmi"]).is_failure

    # Subscriptions: only within the user's rules; a filter reaching wider is refused.
    with pytest.raises(ConnectionError, match="refused"):
        LoginProbe(local_port, ["fl/#"], "viewer", PASSWORDS["viewer"]).__enter__()
    with pytest.raises(ConnectionError, match="refused"):
        LoginProbe(local_port, ["lab/#"], "viewer", PASSWORDS["viewer"]).__enter__()  # only lab/+ for viewer

    with (
        LoginProbe(local_port, [f"{BASE}/#", "lab/#"], "hmi", PASSWORDS["hmi"]) as hmi_side,
        LoginProbe(local_port, [f"{BASE}/health"], "viewer", PASSWORDS["viewer"]) as viewer_side,
    ):
        # The gateway's own in-process publishes reach logged-in subscribers, and count the refusals.
        refusals = {
            "bind": f"127.0.0.1:{local_port}",
            "auth": True,
            "acl": True,
            "refused_logins": 3,  # the three above
            "refused_topics": 2,
        }
        viewer_side.wait_for(
            lambda ms: any(json.loads(m.payload).get("local_broker") == refusals for m in ms), timeout=20
        )
        # Only what viewer subscribed to: amqtt alone would also hand it the retained messages
        # under hmi's filter (gateway and device status) as it connects.
        assert {m.topic for m in viewer_side.messages} == {f"{BASE}/health"}

        # viewer may not publish a command: dropped. The marker after it, allowed, arrives.
        viewer = {"username": "viewer", "password": PASSWORDS["viewer"]}
        command_topic = f"{BASE}/dev/boiler-1/cmd"
        denied = json.dumps({"id": "from-viewer", "tag": "count", "value": 1})
        publish.multiple(
            [(command_topic, denied, 1, False), ("lab/marker", "after the denied one", 1, False)],
            hostname=LOOPBACK,
            port=local_port,
            auth=viewer,
        )
        hmi_side.wait_for(lambda ms: any(m.topic == "lab/marker" for m in ms), timeout=15)
        assert not [m for m in hmi_side.messages if m.topic == command_topic]

        # hmi may publish it; the same check with hmi's login shows the message would have arrived.
        allowed = json.dumps({"id": "from-hmi", "tag": "count", "value": 1})
        hmi = {"username": "hmi", "password": PASSWORDS["hmi"]}
        publish.single(command_topic, allowed, qos=1, hostname=LOOPBACK, port=local_port, auth=hmi)
        messages = hmi_side.wait_for(lambda ms: any(m.topic == command_topic for m in ms), timeout=15)
        assert [json.loads(m.payload)["id"] for m in messages if m.topic == command_topic] == ["from-hmi"]

        # A CONNECT with hmi's client id and a wrong password is refused and changes nothing:
        # hmi's connection keeps its subscriptions (amqtt alone would drop them, silently).
        assert connack(local_port, "hmi", "wrong", client_id=hmi_side.client_id).is_failure
        publish.single("lab/after", "still listening?", qos=1, hostname=LOOPBACK, port=local_port, auth=viewer)
        hmi_side.wait_for(lambda ms: any(m.topic == "lab/after" for m in ms), timeout=15)

    assert gateway.stop() == 0
    log = gateway.log()
    for user, reason in (("-", "no user name"), ("hmi", "wrong password"), ("mallory", "unknown user")):
        assert re.search(f'msg="local broker refused a login" user={user} .* reason="{reason}"', log), user
    assert 'msg="local broker refused a subscribe" user=viewer' in log
    assert 'msg="local broker refused a publish" user=viewer client_id=' in log
    assert f"topic={command_topic}" in log
    assert not [p for p in [*PASSWORDS.values(), "wrong"] if f"={p}" in log or f'"{p}"' in log]


def test_a_lan_bind_needs_logins_or_an_explicit_yes(programs: Programs, tmp_path: Path) -> None:
    port = free_port()
    config = gateway_toml(tmp_path / "gateway", port, f"mqtt://{LOOPBACK}:{free_port()}", sources="")
    lan = config.replace(f'bind = "127.0.0.1:{port}"', f'bind = "0.0.0.0:{port}"')
    path = programs.config("lan", lan)

    checked = check_config(path)
    assert checked.returncode == 1
    assert f"{path}: local_broker.bind: '0.0.0.0:{port}' lets other hosts in" in checked.stdout
    assert "set local_broker.users_file" in checked.stdout
    assert "allow_anonymous_on_lan = true" in checked.stdout

    # `run` refuses to start: nothing listens, exit 2, the same line on stderr.
    done = subprocess.run(
        [str(BIN / "fieldlink-gateway"), "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "local_broker.bind:" in done.stderr

    # Said on purpose, it starts.
    explicit = programs.config("lan-yes", with_keys(lan, "local_broker", "allow_anonymous_on_lan = true"))
    assert check_config(explicit).returncode == 0

    # A password file amqtt could not use is named with its line, before anything starts.
    users = tmp_path / "users"
    users.write_text("hmi:$6$salt$notargon\n")
    bad = programs.config("bad-users", with_keys(lan, "local_broker", f'users_file = "{users}"') + ACL)
    checked = check_config(bad)
    assert checked.returncode == 1
    assert f"local_broker.users_file: {users} line 1: user 'hmi' has no Argon2 hash" in checked.stdout
    os.unlink(users)
    checked = check_config(bad)
    assert f"local_broker.users_file: cannot read {users}: No such file or directory" in checked.stdout

    # Rules and command rights must name users the file has.
    set_password(users, "hmi", PASSWORDS["hmi"])
    commands = '\n[commands]\nallow_from = ["local"]\nlocal_users = ["hmi", "operator"]\n'
    checked = check_config(programs.config("unknown-users", bad.read_text() + commands))
    assert checked.returncode == 1
    assert f"local_broker.acl.viewer: no user 'viewer' in {users}" in checked.stdout
    assert f"commands.local_users[1]: no user 'operator' in {users}" in checked.stdout
    assert "local_broker.acl.hmi" not in checked.stdout
