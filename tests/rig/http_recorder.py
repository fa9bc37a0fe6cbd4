"""A loopback HTTP(S) server standing in for an SMS provider or a webhook receiver:
it records every request and answers what the test told it to."""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.rig.ports import LOOPBACK

__all__ = ["Answer", "HttpRecorder", "Recorded"]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: Message  # case-insensitive lookup, as on the wire
    body: bytes


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class HttpRecorder:
    """A loopback HTTP(S) server that records every request and gives the answers it was told to."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Recorded] = []
        self.answers: list[Answer] = []  # consumed in order; then `default`
        self.default = Answer(200, b"ok", {"Content-Type": "text/plain"})
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # name fixed by http.server
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                recorder.requests.append(Recorded(self.command, self.path, self.headers, body))
                answer = recorder.answers.pop(0) if recorder.answers else recorder.default
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.02,), name=f"http-{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        host = "localhost" if self.scheme == "https" else LOOPBACK
        return f"{self.scheme}://{host}:{self.port}"

    def __enter__(self) -> HttpRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
