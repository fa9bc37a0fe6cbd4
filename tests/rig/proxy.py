"""A TCP proxy on loopback that breaks the link to the cloud broker on demand.

The gateway connects to the proxy instead of the broker; the test then turns the
link into what a field site sees: a silently dead link (`stall`), connections
reset by a NAT box or a reboot (`cut`), a broker host that refuses connections
(`refuse`), and back to normal (`pass_`).

The proxy runs its own asyncio loop in a daemon thread, so that ordinary
synchronous tests can drive it while the programs under test run as processes.
Every mode change runs in that loop and returns once it took effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from tests.rig.ports import LOOPBACK, free_port

CHUNK = 65536
# A stalled direction holds at most this much before the proxy stops reading it:
# the sender's socket buffers then fill and its writes block, as on a dead link.
HOLD_LIMIT = 256 * 1024
# SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
LINGER_RST = struct.pack("ii", 1, 0)
CALL_TIMEOUT = 5.0
UP, DOWN = 0, 1  # client -> upstream, upstream -> client

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(eq=False)
class _Link:
    """One client connection and, once the link passes, its upstream connection."""

    client_sock: socket.socket
    client: Stream | None = None  # set once the accepted socket has its asyncio transport
    upstream: Stream | None = None
    # Per direction: bytes read but not forwarded yet (stalled), EOF read, EOF forwarded.
    held: tuple[list[bytes], list[bytes]] = field(default_factory=lambda: ([], []))
    eof_read: list[bool] = field(default_factory=lambda: [False, False])
    eof_sent: list[bool] = field(default_factory=lambda: [False, False])
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closed: bool = False

    def reader(self, direction: int) -> asyncio.StreamReader | None:
        stream = self.client if direction == UP else self.upstream
        return stream[0] if stream else None

    def writer(self, direction: int) -> asyncio.StreamWriter | None:
        stream = self.upstream if direction == UP else self.client
        return stream[1] if stream else None


class FaultProxy:
    """Forwards 127.0.0.1:`port` to the upstream; `stall()`, `cut()`, `refuse()` and `pass_()` break it."""

    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int | None = None) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = LOOPBACK
        # Picked now, like the servers' ports, so a config can name it before start().
        self.port = listen_port if listen_port is not None else free_port()
        self.stalled = False
        self.refusing = False
        self._links: set[_Link] = set()
        # Our own listening socket, not asyncio.Server: on 3.11, closing a Server leaks (never
        # resets) a connection accepted in the same loop iteration; refuse() must reset it.
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._passing = asyncio.Event()  # set while not stalled; only used in the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Counters are written in the loop thread and read (or waited on) by the test.
        self._changed = threading.Condition()
        self._accepted = 0
        self._bytes = [0, 0]
        self._held = 0

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def accepted(self) -> int:
        """Client connections accepted since start, in every mode."""
        with self._changed:
            return self._accepted

    @property
    def bytes_up(self) -> int:
        """Bytes forwarded client -> upstream (held bytes count once delivered)."""
        with self._changed:
            return self._bytes[UP]

    @property
    def bytes_down(self) -> int:
        with self._changed:
            return self._bytes[DOWN]

    @property
    def held_bytes(self) -> int:
        """Bytes read during a stall and not delivered yet, both directions."""
        with self._changed:
            return self._held

    @property
    def open_connections(self) -> int:
        with self._changed:
            return len(self._links)

    # --- control, from the test thread -------------------------------------------------

    def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError(f"fault proxy on port {self.port} is already running")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()
        try:
            self._call(self._open)
        except BaseException:  # e.g. the port is taken: leave no loop thread behind
            self._stop_loop()
            raise

    def stop(self) -> None:
        """Reset every connection and stop listening; counters are kept, start() listens again."""
        if self._loop is None:
            return
        try:
            self._call(self._shutdown)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        assert self._loop is not None
        assert self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT)
        self._loop.close()
        self._loop = self._thread = None

    def pass_(self) -> None:
        """Forward both ways and accept again; bytes held by a stall are delivered first, as TCP would."""
        self._call(self._set_mode, False, False)

    def stall(self) -> None:
        """Black-hole the link: connections stay open and new ones are accepted, nothing is forwarded."""
        self._call(self._set_mode, True, False)

    def refuse(self) -> None:
        """Close the listening socket: connects fail with ECONNREFUSED. Open connections are left as
        they are (forwarding or stalled): add `cut()` for a broker that died with its connections."""
        self._call(self._set_mode, self.stalled, True)

    def cut(self) -> None:
        """Reset (RST) every open connection, on both sides; the mode for new connections is unchanged."""
        self._call(self._cut)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "the condition") -> None:
        """Block until `predicate()` is true; it is re-checked whenever a counter changes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self!r}: {what} not reached after {timeout:.1f} s")
                self._changed.wait(remaining)

    def wait_connections(self, count: int, timeout: float = 5.0) -> None:
        """Block until `count` connections were accepted in total."""
        self.wait_until(lambda: self._accepted >= count, timeout, f"{count} accepted connections")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        mode = "refuse" if self.refusing else "stall" if self.stalled else "pass"
        return (
            f"FaultProxy({self.port} -> {self.upstream_host}:{self.upstream_port}, {mode}, accepted={self._accepted}, "
            f"open={len(self._links)}, up={self._bytes[UP]}, down={self._bytes[DOWN]}, held={self._held})"
        )

    def _call(self, func: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        if self._loop is None:
            raise RuntimeError(f"fault proxy on port {self.port} is not running")
        asyncio.run_coroutine_threadsafe(func(*args), self._loop).result(CALL_TIMEOUT)

    # --- the loop side -----------------------------------------------------------------

    async def _open(self) -> None:
        # An Event binds to the loop that first waits on it: a restart needs a new one.
        self._passing = asyncio.Event()
        self._passing.set()
        self.stalled = self.refusing = False
        await self._listen()

    async def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Lets pass_() bind the same port again after refuse(), despite TIME_WAIT connections.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        listener.setblocking(False)
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)
        self._listener = listener

    def _stop_listening(self) -> None:
        if self._listener is not None:
            # Both in this loop step: nothing is accepted in between. The kernel resets
            # connections still in the backlog; connects from now on are refused.
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    async def _set_mode(self, stalled: bool, refusing: bool) -> None:
        if refusing:
            self._stop_listening()
        elif self._listener is None:
            await self._listen()
        self.stalled, self.refusing = stalled, refusing
        if stalled:
            self._passing.clear()
        else:
            self._passing.set()
            for link in list(self._links):
                self._flush(link, UP)
                self._flush(link, DOWN)

    async def _cut(self) -> None:
        for link in list(self._links):
            self._drop(link, reset=True)

    async def _shutdown(self) -> None:
        self._stop_listening()
        await self._cut()
        tasks = self._tasks | {task for link in self._links for task in link.tasks}
        await asyncio.gather(*tasks, return_exceptions=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            link = _Link(conn)
            with self._changed:
                self._accepted += 1
                self._links.add(link)
                self._changed.notify_all()
            self._spawn(self._tasks, self._serve(link))

    def _spawn(self, tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _serve(self, link: _Link) -> None:
        # Not cancelled by _drop(): the socket is handed over to its transport inside this call.
        link.client = await asyncio.open_connection(sock=link.client_sock)
        if link.closed:  # cut() came first: its SO_LINGER makes this abort a reset
            link.client[1].transport.abort()
            return
        self._spawn(link.tasks, self._pump(link, UP))
        self._spawn(link.tasks, self._connect(link))

    async def _connect(self, link: _Link) -> None:
        # Connect upstream only once the link passes: behind a dead link the broker never sees the SYN.
        await self._passing.wait()
        try:
            link.upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            self._drop(link, reset=True)  # the broker is down: the client sees its connection reset
            return
        self._flush(link, UP)
        await self._pump(link, DOWN)

    async def _pump(self, link: _Link, direction: int) -> None:
        reader = link.reader(direction)
        assert reader is not None
        try:
            while True:
                if sum(map(len, link.held[direction])) >= HOLD_LIMIT:
                    await self._passing.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                link.held[direction].append(data)
                with self._changed:
                    self._held += len(data)
                    self._changed.notify_all()
                self._flush(link, direction)
                writer = link.writer(direction)
                if writer is not None and not self.stalled:
                    await writer.drain()  # backpressure from the receiver while the link passes
        except OSError:  # reset by one side: reset the other one too
            self._drop(link, reset=True)
            return
        link.eof_read[direction] = True
        if link.upstream is None and self.stalled:
            # The client gave up on a link the broker never saw: nothing to deliver later.
            self._drop(link, reset=False)
        else:
            self._flush(link, direction)

    def _flush(self, link: _Link, direction: int) -> None:
        """Deliver what `direction` holds, then its EOF, unless stalled (writes are buffered: order is kept)."""
        writer = link.writer(direction)
        if self.stalled or writer is None or link.closed:
            return
        chunks = list(link.held[direction])
        link.held[direction].clear()
        if chunks:
            # Count before writing: a test that sees the bytes arrive must also see them counted.
            sent = sum(map(len, chunks))
            with self._changed:
                self._bytes[direction] += sent
                self._held -= sent
                self._changed.notify_all()
            for chunk in chunks:
                writer.write(chunk)
        if link.eof_read[direction] and not link.eof_sent[direction]:
            link.eof_sent[direction] = True
            if writer.can_write_eof():
                with contextlib.suppress(OSError):  # the receiver is gone already (ENOTCONN after its reset)
                    writer.write_eof()  # a half-close, as the sender did
            if all(link.eof_sent):
                self._drop(link, reset=False)

    def _drop(self, link: _Link, *, reset: bool) -> None:
        if link.closed:
            return
        link.closed = True
        if reset:
            # The client's raw socket, too: if _serve() has not made its transport yet, it aborts it later.
            upstream_sock = link.upstream[1].get_extra_info("socket") if link.upstream else None
            for sock in filter(None, (link.client_sock, upstream_sock)):
                with contextlib.suppress(OSError):  # already closed by the peer's reset
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        for stream in filter(None, (link.client, link.upstream)):
            if reset:
                stream[1].transport.abort()
            else:
                stream[1].close()
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
        with self._changed:
            self._held -= sum(map(len, link.held[UP])) + sum(map(len, link.held[DOWN]))
            self._links.discard(link)
            self._changed.notify_all()
