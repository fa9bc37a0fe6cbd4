"""The live dashboard page: a tiny static HTTP server on asyncio, standard library only.

It serves ``cloud/web/static/`` (index.html, app.js, app.css, and ``vendor/mqtt.min.js``,
the MQTT.js browser bundle that ``make web`` copies there from npm) and ``/config.json``,
which tells the page where the broker's MQTT-over-WebSocket listener is and which
dashboard prefix to subscribe under. The page then talks to the broker directly; this
server only hands out files (docs/web-dashboard.md).

GET and HEAD only, one request per connection: a handful of small files for a few
operators' browsers needs neither keep-alive nor a framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["STATIC_DIR", "VENDOR_BUNDLE", "DashboardWebServer", "Response"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "web" / "static"
VENDOR_BUNDLE = "vendor/mqtt.min.js"  # relative to the static folder; made by `make web`, not committed

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
# The page loads its own files only and opens WebSockets to the broker; nothing inline.
# MQTT.js runs its keepalive timers in a blob: worker (not throttled in a background tab).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; worker-src blob:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}
MAX_REQUEST_HEAD = 16 * 1024  # request line and headers; a browser sends well under 2 KiB
REQUEST_TIMEOUT = 10.0  # a client that does not finish its request in time is dropped
WILDCARD_HOSTS = {"", "0.0.0.0", "::"}  # noqa: S104 (names of wildcards, not a bind)


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self, *, head_only: bool = False) -> bytes:
        headers = {
            "Content-Type": self.content_type,
            "Content-Length": str(len(self.body)),
            "Cache-Control": "no-cache",  # revalidate: the page changes with the cloud's version
            "Connection": "close",
            **SECURITY_HEADERS,
            **self.headers,
        }
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, '')}", *(f"{k}: {v}" for k, v in headers.items())]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def _text(status: int, message: str, **headers: str) -> Response:
    return Response(status, (message + "\n").encode(), headers=headers)


def _split_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


class DashboardWebServer:
    """Serves the page from ``static_dir`` on ``bind`` (HOST:PORT; port 0 picks a free one)."""

    def __init__(self, bind: str, *, mqtt_url: str, prefix: str, static_dir: Path = STATIC_DIR) -> None:
        self.host, self.port = _split_bind(bind)
        self.mqtt_url = mqtt_url
        self.prefix = prefix
        self.static_dir = static_dir.resolve()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_REQUEST_HEAD)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("dashboard page at %s", self.url, extra={"mqtt_url": self.mqtt_url})
        if not (self.static_dir / VENDOR_BUNDLE).is_file():
            log.warning(
                "dashboard page: the MQTT.js bundle is missing, the page will say so; run `make web`",
                extra={"path": str(self.static_dir / VENDOR_BUNDLE)},
            )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):  # a browser holding a connection open must not stall shutdown
                    await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, response = self.answer(head)
            writer.write(response.encode(head_only=method == "HEAD"))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client went away or never finished its request: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def answer(self, head: bytes) -> tuple[str, Response]:
        """The response to a raw request head (request line and headers), and the request's method."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "", _text(400, "bad request line")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return method, _text(405, "only GET and HEAD", Allow="GET, HEAD")
        host = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("host:")), "")
        path = urlsplit(target).path
        if path == "/config.json":
            return method, self._config_json(host)
        file = self._file(path)
        if file is None:
            if path == "/" + VENDOR_BUNDLE:
                return method, _text(404, "the MQTT.js bundle is not installed: run `make web`")
            return method, _text(404, "not found")
        try:
            body = file.read_bytes()
        except OSError:  # removed or unreadable since we looked
            return method, _text(404, "not found")
        return method, Response(200, body, CONTENT_TYPES.get(file.suffix, "application/octet-stream"))

    def _file(self, path: str) -> Path | None:
        """The file under the static folder that ``path`` names, or None: never anything outside it."""
        relative = unquote(path).lstrip("/") or "index.html"
        if "\0" in relative or "\\" in relative:
            return None
        # No "..", no empty or dot segments (hidden files), checked after decoding %2e%2e and the like.
        if any(not part or part.startswith(".") for part in relative.split("/")):
            return None
        candidate = (self.static_dir / relative).resolve()
        # resolve() follows symlinks: one pointing outside the folder is refused too.
        if not candidate.is_relative_to(self.static_dir) or not candidate.is_file():
            return None
        return candidate

    def _config_json(self, request_host: str) -> Response:
        url = self.mqtt_url
        parsed = urlsplit(url)
        if (parsed.hostname or "") in WILDCARD_HOSTS and request_host:
            # The broker listens on every interface: the browser reaches it at the host it
            # reached this page at (a browser cannot connect to 0.0.0.0).
            page_host = urlsplit(f"//{request_host}").hostname or ""
            host = f"[{page_host}]" if ":" in page_host else page_host
            url = urlunsplit(parsed._replace(netloc=f"{host}:{parsed.port}" if parsed.port else host))
        body = json.dumps({"mqtt_url": url, "prefix": self.prefix}).encode()
        return Response(200, body, CONTENT_TYPES[".json"], headers={"Cache-Control": "no-store"})
