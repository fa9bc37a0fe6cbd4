"""cloud/web.py over real loopback sockets: files with their content types, HEAD, 404s,
no way out of the static folder, /config.json; and the [web] config section's checks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cloud.config import CloudConfig, load_cloud_config
from cloud.web import STATIC_DIR, DashboardWebServer
from fieldlink.configkit import ConfigError

Reply = tuple[int, dict[str, str], bytes]


async def _send(port: int, raw: bytes) -> Reply:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()  # the server closes after one answer
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def _exchange(static_dir: Path, *requests: bytes, mqtt_url: str = "ws://127.0.0.1:9001") -> list[Reply]:
    async def run() -> list[Reply]:
        server = DashboardWebServer("127.0.0.1:0", mqtt_url=mqtt_url, prefix="dash", static_dir=static_dir)
        await server.start()
        try:
            async with asyncio.timeout(10):
                return [await _send(server.port, raw) for raw in requests]
        finally:
            await server.stop()

    return asyncio.run(run())


def _get(path: str, method: str = "GET", host: str = "127.0.0.1") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\n\r\n".encode()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A static folder with one file of each kind, a hidden file, a symlink out, and a secret beside it."""
    (tmp_path / "secret.txt").write_text("TOP-SECRET")
    static = tmp_path / "static"
    (static / "sub").mkdir(parents=True)
    (static / "index.html").write_text("<!doctype html><title>t</title>")
    (static / "app.js").write_text("console.log(1)")
    (static / "app.css").write_text("body{}")
    (static / "sub" / "data.json").write_text("{}")
    (static / "blob.bin").write_bytes(b"\x00\x01")
    (static / ".env").write_text("TOP-SECRET")
    (static / "out").symlink_to(tmp_path / "secret.txt")
    return static


def test_files_are_served_with_their_content_types(site: Path) -> None:
    replies = _exchange(
        site, _get("/"), _get("/app.js"), _get("/app.css?v=2"), _get("/sub/data.json"), _get("/blob.bin")
    )
    types = [headers["content-type"] for _, headers, _ in replies]
    assert [status for status, _, _ in replies] == [200] * 5
    assert types == [
        "text/html; charset=utf-8",
        "text/javascript; charset=utf-8",
        "text/css; charset=utf-8",
        "application/json",
        "application/octet-stream",
    ]
    _, headers, body = replies[0]
    assert body == (site / "index.html").read_bytes()
    assert headers["content-length"] == str(len(body))
    assert headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in headers["content-security-policy"]


def test_head_answers_the_headers_without_a_body(site: Path) -> None:
    [(status, headers, body)] = _exchange(site, _get("/app.js", "HEAD"))
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(len("console.log(1)"))


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/sub/../../secret.txt",
        "/..%2fsecret.txt",
        "/sub/%2E%2E/%2E%2E/secret.txt",
        "/out",  # a symlink pointing outside the folder
        "/.env",
        "/%00",
        "/..\\secret.txt",
        "//etc/passwd",
        "/sub/",
        "/nothing-here.html",
    ],
)
def test_nothing_outside_the_folder_and_nothing_missing_is_served(site: Path, path: str) -> None:
    [(status, _, body)] = _exchange(site, _get(path))
    assert status == 404
    assert b"TOP-SECRET" not in body
    assert b"root:" not in body


def test_a_missing_bundle_says_how_to_get_it(site: Path) -> None:
    [(status, _, body)] = _exchange(site, _get("/vendor/mqtt.min.js"))
    assert status == 404
    assert b"make web" in body


def test_other_methods_and_garbage_are_refused(site: Path) -> None:
    (post, garbage) = _exchange(site, _get("/", "POST"), b"HELLO\r\n\r\n")
    assert post[0] == 405
    assert post[1]["allow"] == "GET, HEAD"
    assert garbage[0] == 400


def test_config_json_tells_the_page_where_the_broker_is(site: Path) -> None:
    [(status, headers, body)] = _exchange(site, _get("/config.json"))
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert json.loads(body) == {"mqtt_url": "ws://127.0.0.1:9001", "prefix": "dash"}


def test_a_wildcard_listener_is_reached_at_the_host_the_page_came_from(site: Path) -> None:
    replies = _exchange(
        site,
        _get("/config.json", host="plant-dash.example:8080"),
        _get("/config.json", host="[fd00::5]:8080"),
        mqtt_url="ws://0.0.0.0:9001/mqtt",
    )
    assert [json.loads(body)["mqtt_url"] for _, _, body in replies] == [
        "ws://plant-dash.example:9001/mqtt",
        "ws://[fd00::5]:9001/mqtt",
    ]


def test_the_real_page_is_in_the_package() -> None:
    [(status, _, body)] = _exchange(STATIC_DIR, _get("/"))
    assert status == 200
    for reference in (b'src="vendor/mqtt.min.js"', b'src="app.js"', b'href="app.css"'):
        assert reference in body
    assert (STATIC_DIR / "app.js").is_file()
    assert (STATIC_DIR / "app.css").is_file()


# --- the [web] config section ------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> CloudConfig:
    path = tmp_path / "cloud.toml"
    path.write_text(text)
    return load_cloud_config(path)


def test_the_page_connects_to_the_embedded_brokers_websocket_listener_by_default(tmp_path: Path) -> None:
    broker = '[broker]\nembedded = true\nbind = "127.0.0.1:1883"\nws_bind = "127.0.0.1:9001"\n'
    config = _load(tmp_path, broker + "[web]\nenabled = true\n")
    assert config.web.bind == "127.0.0.1:8080"
    assert config.web.browser_mqtt_url(config.broker) == "ws://127.0.0.1:9001"
    assert not _load(tmp_path, broker).web.enabled  # off unless asked for


def test_the_demo_serves_the_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIELDLINK_DEMO_CLOUD_WS_PORT", raising=False)
    config = load_cloud_config(Path(__file__).resolve().parents[2] / "configs" / "demo" / "cloud.toml")
    assert config.web.enabled
    assert config.web.browser_mqtt_url(config.broker) == "ws://127.0.0.1:11885"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[web]\nenabled = true\n",
            "web.mqtt_url: the page needs the broker's WebSocket URL",
        ),
        (
            '[web]\nenabled = true\nmqtt_url = "mqtt://broker:1883"\n',
            "web.mqtt_url: must start with ws:// or wss://",
        ),
        (
            '[web]\nenabled = true\nbind = "8080"\nmqtt_url = "ws://broker:9001"\n',
            "web.bind: must be HOST:PORT, got '8080'",
        ),
        (
            '[dashboard]\nenabled = false\n[web]\nenabled = true\nmqtt_url = "ws://broker:9001"\n',
            "web.enabled: the page shows dashboard topics",
        ),
    ],
)
def test_web_config_problems_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert any(line.startswith(f"{tmp_path / 'cloud.toml'}: {expected}") for line in caught.value.lines()), (
        caught.value.lines()
    )
