"""The InfluxDB store's own HTTP write (cloud/stores/influxdb_http.py) against a loopback HTTP
server that answers as InfluxDB does: the request influxdb-client would send, keep-alive with
a reconnect when the server dropped the idle connection, and every answer mapped to the
store's errors as before (victoria-metrics itself: tests/integration/test_influx_store.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import SecretStr

from cloud.config import load_cloud_config
from cloud.stores.base import StoreRejected, StoreUnavailable
from cloud.stores.influxdb import InfluxDBConfig, InfluxDBStore
from fieldlink.configkit import ConfigError
from fieldlink.wire import Record, Value
from tests.rig.ports import free_port

TS = 1_700_000_000_000
RECORDS = [Record("plant-1", "gw-1", "boiler-1", seq, TS + seq, {"t": Value.of(20.5 + seq)}) for seq in range(3)]
LINES = [f"fieldlink,site=plant-1,gateway=gw-1,device=boiler-1 t={20.5 + s} {TS + s}" for s in range(3)]


@dataclass
class Request:
    line: str
    headers: dict[str, str]
    body: bytes


@dataclass
class InfluxLike:
    """Answers each request with the next scripted answer (raw HTTP), or hangs on None."""

    answers: list[bytes | None] = field(default_factory=list)
    close_after_answer: bool = False
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    handlers: list[asyncio.Task[None]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        self.handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while line := await reader.readline():
                headers = {}
                while (h := await reader.readline()) != b"\r\n":
                    name, _, value = h.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers["content-length"]))
                self.requests.append(Request(line.decode().strip(), headers, body))
                answer = self.answers.pop(0) if self.answers else b"HTTP/1.1 204 No Content\r\n\r\n"
                if answer is None:
                    await asyncio.Event().wait()  # no answer, until the test ends
                writer.write(answer)
                await writer.drain()
                if self.close_after_answer:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()

    def drop_connections(self) -> None:
        for writer in self.writers:
            writer.close()


def run(test: Callable[[InfluxLike, int], Awaitable[None]], server: InfluxLike | None = None) -> InfluxLike:
    influx = server or InfluxLike()

    async def main() -> None:
        listener = await asyncio.start_server(influx.handle, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        try:
            async with asyncio.timeout(20):
                await test(influx, port)
        finally:
            listener.close()
            for handler in influx.handlers:
                handler.cancel()
            await asyncio.gather(*influx.handlers, return_exceptions=True)

    asyncio.run(main())
    return influx


async def opened(port: int, **settings: object) -> InfluxDBStore:
    config = {"kind": "influxdb", "url": f"http://127.0.0.1:{port}", "token": SecretStr("t0ken")} | settings
    store = InfluxDBStore(InfluxDBConfig(**config))  # type: ignore[arg-type]
    await store.open()
    return store


def test_the_request_is_influxdb_client_s_and_the_connection_is_kept() -> None:
    async def test(_influx: InfluxLike, port: int) -> None:
        store = await opened(port, url=f"http://127.0.0.1:{port}/influx/", org="plant ops", bucket="b&1")
        await store.write(RECORDS)
        await store.write_prepared(store.prepare(RECORDS[:1]))
        await store.close()

    influx = run(test)
    first, second = influx.requests
    assert first.line == "POST /influx/api/v2/write?org=plant+ops&bucket=b%261&precision=ms HTTP/1.1"
    assert first.headers["authorization"] == "Token t0ken"
    assert first.headers["content-type"] == "text/plain; charset=utf-8"
    assert first.headers["host"] == f"127.0.0.1:{influx.writers[0].get_extra_info('sockname')[1]}"
    assert first.body.decode().split("\n") == LINES
    assert second.body.decode() == LINES[0]
    assert influx.connections == 1


def test_batch_max_points_splits_writes_and_no_token_sends_no_header() -> None:
    async def test(_influx: InfluxLike, port: int) -> None:
        store = await opened(port, batch_max_points=2, token=SecretStr(""))
        await store.write(RECORDS)

    influx = run(test)
    assert [r.body.decode().split("\n") for r in influx.requests] == [LINES[:2], LINES[2:]]
    assert "authorization" not in influx.requests[0].headers


def test_units_as_tags_keep_a_record_s_points_in_one_request() -> None:
    two = [Record("p", "g", "d", seq, TS + seq, {"a": Value.of(1.5, "V"), "b": Value.of(2, "A")}) for seq in range(3)]

    async def test(_influx: InfluxLike, port: int) -> None:
        store = await opened(port, units="tag", batch_max_points=3)
        await store.write(two)

    influx = run(test)
    bodies = [r.body.decode().split("\n") for r in influx.requests]
    assert [len(b) for b in bodies] == [4, 2]
    assert bodies[1] == [
        f"fieldlink,site=p,gateway=g,device=d,unit=V a=1.5 {TS + 2}",
        f"fieldlink,site=p,gateway=g,device=d,unit=A b=2i {TS + 2}",
    ]


def test_an_idle_connection_the_server_dropped_is_replaced_without_a_failure() -> None:
    async def test(influx: InfluxLike, port: int) -> None:
        store = await opened(port)
        await store.write(RECORDS)
        influx.drop_connections()  # as a server does with an idle keep-alive connection
        await store.write(RECORDS)

    influx = run(test)
    assert len(influx.requests) == 2
    assert influx.connections == 2


def test_connection_close_answers_are_followed_by_a_new_connection() -> None:
    async def test(_influx: InfluxLike, port: int) -> None:
        store = await opened(port)
        for _ in range(3):
            await store.write(RECORDS)

    influx = run(
        test, InfluxLike(close_after_answer=True, answers=[b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"])
    )
    assert influx.connections == 3


def answer(status: str, body: bytes = b"", headers: str = "", chunked: bool = False) -> bytes:
    if chunked:
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:5], body[5:]) if part)
        return f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n{headers}\r\n".encode() + chunks + b"0\r\n\r\n"
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


@pytest.mark.parametrize("chunked", [False, True])
def test_bad_data_answers_are_refusals_with_influxdb_s_reason(chunked: bool) -> None:
    body = b'{"code":"invalid","message":"unable to parse \'x\': bad timestamp"}'

    async def test(_influx: InfluxLike, port: int) -> None:
        store = await opened(port)
        for status in ("400 Bad Request", "413 Request Entity Too Large", "422 Unprocessable Entity"):
            with pytest.raises(StoreRejected) as refused:
                await store.write(RECORDS)
            assert str(refused.value) == f"InfluxDB refused the write ({status[:3]}): {body.decode()}"
        await store.write(RECORDS)  # the connection is still good

    statuses = ("400 Bad Request", "413 Request Entity Too Large", "422 Unprocessable Entity")
    influx = run(test, InfluxLike(answers=[answer(s, body, chunked=chunked) for s in statuses]))
    assert influx.connections == 1


def test_other_answers_are_unavailability_with_retry_after() -> None:
    async def test(_influx: InfluxLike, port: int) -> None:
        store = await opened(port)
        with pytest.raises(StoreUnavailable) as unavailable:
            await store.write(RECORDS)
        assert str(unavailable.value) == "InfluxDB answered 401: Unauthorized"
        assert unavailable.value.retry_after is None
        with pytest.raises(StoreUnavailable) as unavailable:
            await store.write(RECORDS)
        assert str(unavailable.value) == "InfluxDB answered 503: Service Unavailable"
        assert unavailable.value.retry_after == 7.0

    run(
        test,
        InfluxLike(
            answers=[
                answer("401 Unauthorized", b'{"code":"unauthorized"}'),
                answer("503 Service Unavailable", headers="Retry-After: 7\r\n", chunked=True, body=b"busy now"),
            ]
        ),
    )


def test_no_server_and_no_answer_are_unavailability() -> None:
    async def test(_influx: InfluxLike, port: int) -> None:
        store = await opened(port, timeout=0.3)
        with pytest.raises(StoreUnavailable, match=r"^InfluxDB unreachable: no answer within 0.3s$"):
            await store.write(RECORDS)
        await store.write(RECORDS)  # a new connection after the timeout
        closed = await opened(free_port())
        with pytest.raises(StoreUnavailable, match=r"^InfluxDB unreachable: cannot connect to 127.0.0.1:\d+"):
            await closed.write(RECORDS)

    influx = run(test, InfluxLike(answers=[None]))
    assert influx.connections == 2


def test_a_garbled_answer_is_unavailability() -> None:
    async def test(_influx: InfluxLike, port: int) -> None:
        store = await opened(port)
        with pytest.raises(StoreUnavailable, match=r"^InfluxDB unreachable: not an HTTP answer"):
            await store.write(RECORDS)

    run(test, InfluxLike(answers=[b"SSH-2.0-OpenSSH\r\n\r\n"]))


@pytest.mark.parametrize("url", ["127.0.0.1:8086", "ftp://host", "http://", "http://host:port"])
def test_the_url_must_be_http_with_a_host(tmp_path: Path, url: str) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text(f'[store]\nkind = "influxdb"\nurl = "{url}"\n')
    with pytest.raises(ConfigError) as problems:
        load_cloud_config(path)
    assert [line for line in problems.value.lines() if "store.url" in line]
