"""InfluxDB's ``POST /api/v2/write`` over one keep-alive HTTP/1.1 connection on the event loop.

The request influxdb-client's synchronous write API sends (same endpoint, query, token
header and body), without its thread. A write in a thread needs the GIL for every step
of the request, and while the ingest loop decodes the next round (pure Python, holding
the GIL) each of those steps waited for the 5 ms switch interval: a 5,000-line write to
victoria-metrics took 75 ms instead of 15 ms. On the loop, the request costs a few
system calls between two messages and InfluxDB's own work overlaps the decoding.

What influxdb-client would raise becomes :class:`WriteFailed`, which the store maps to
its errors as before. Not supported, as before: proxies, gzip, client certificates.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

__all__ = ["WriteAnswer", "WriteEndpoint", "WriteFailed"]

MAX_BODY_KEPT = 4096  # characters of an error answer kept for the log and the reason


class WriteFailed(Exception):
    """No answer: the server could not be reached, hung up, timed out or broke the protocol."""


@dataclass(frozen=True)
class WriteAnswer:
    status: int
    reason: str
    headers: dict[str, str]  # names in lower case
    body: str


class WriteEndpoint:
    """``post(body)`` writes line protocol and returns the server's answer (any status)."""

    def __init__(self, url: str, *, org: str, bucket: str, token: str, precision: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout = timeout
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        target = f"{parts.path.rstrip('/')}/api/v2/write?" + urlencode(
            {"org": org, "bucket": bucket, "precision": precision}
        )
        host = parts.netloc.rpartition("@")[2]  # as written in the URL, without user info
        head = [
            f"POST {target} HTTP/1.1",
            f"Host: {host}",
            "User-Agent: fieldlink-cloud",
            "Accept: application/json",
            "Content-Type: text/plain; charset=utf-8",
        ]
        if token:
            head.append(f"Authorization: Token {token}")
        self._head = ("\r\n".join(head) + "\r\nContent-Length: ").encode()
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()  # one request at a time on the connection

    async def post(self, body: bytes) -> WriteAnswer:
        async with self._lock:
            # A kept-alive connection the server closed while idle fails before any answer:
            # then the write is sent once more on a new connection (writes are idempotent).
            for retry in (False, True):
                reused = self._streams is not None
                try:
                    async with asyncio.timeout(self.timeout):
                        return await self._exchange(body)
                except TimeoutError:
                    self.close()
                    raise WriteFailed(f"no answer within {self.timeout:g}s") from None
                except _NoAnswer as exc:
                    self.close()
                    if retry or not reused:
                        raise WriteFailed(str(exc) or type(exc).__name__) from None
            raise AssertionError("unreachable")

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None

    async def _exchange(self, body: bytes) -> WriteAnswer:
        if self._streams is None:
            try:
                self._streams = await asyncio.open_connection(
                    self.host, self.port, ssl=self._tls, server_hostname=self.host if self._tls else None
                )
            except OSError as exc:
                raise WriteFailed(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        reader, writer = self._streams
        try:
            writer.write(self._head + str(len(body)).encode() + b"\r\n\r\n")
            writer.write(body)
            await writer.drain()
            answer, keep = await _read_answer(reader)
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise _NoAnswer(_describe(exc)) from None
        if not keep:
            self.close()
        return answer


class _NoAnswer(Exception):
    """The exchange broke before a complete answer arrived."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError | EOFError):
        return "the server closed the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def _read_answer(reader: asyncio.StreamReader) -> tuple[WriteAnswer, bool]:
    """The answer, and whether the connection can carry the next request."""
    status_line = await reader.readline()
    if not status_line:
        raise EOFError
    version, _, rest = status_line.decode("latin-1").strip().partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    status = int(code)
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n"):
        if not line:
            raise EOFError
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if status in (204, 304) or 100 <= status < 200:
        data = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        data = await _read_chunked(reader)
    elif "content-length" in headers:
        data = await reader.readexactly(int(headers["content-length"]))
    else:
        data, keep = await reader.read(), False  # delimited by the end of the connection
    text = data[: MAX_BODY_KEPT * 4].decode("utf-8", "replace")[:MAX_BODY_KEPT]
    return WriteAnswer(status, reason, headers, text), keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)  # ValueError when garbled
        if size == 0:
            break
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)  # CRLF
    while (line := await reader.readline()) not in (b"\r\n", b"\n"):  # trailers
        if not line:
            raise EOFError
    return b"".join(parts)
