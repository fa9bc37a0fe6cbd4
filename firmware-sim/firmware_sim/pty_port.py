"""A serial port for the gateway made of one pseudo-terminal, in pure Python.

``os.openpty()`` gives a master and a slave end. The slave is a real tty device
(``/dev/pts/N``) that pyserial opens like any serial port; ``path`` becomes a
symlink to it so tests and configs have a stable name. The simulator reads and
writes the master: what the gateway writes to its port is what we read, and the
other way round. No copying task and no socat are needed.

We keep our own descriptor of the slave open: otherwise, between two clients,
reading the master fails with EIO (Linux reports a hang-up when no slave is open).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import tty
from pathlib import Path

from . import SimulatorError

__all__ = ["PtyPort"]

log = logging.getLogger(__name__)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class PtyPort:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.device = ""  # /dev/pts/N once open
        self._master = -1
        self._slave = -1

    def open(self) -> None:
        """Create the pty and the symlink; raise SimulatorError if ``path`` is taken."""
        if self.path.exists() and not self.path.is_symlink():
            raise SimulatorError(f"{self.path} exists and is not a symlink: not replacing it")
        self.path.parent.mkdir(parents=True, exist_ok=True)  # OSError: the caller names the server
        self._master, self._slave = os.openpty()
        # Raw and without echo until the client sets its own mode: an echo would
        # turn our replies into requests.
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.device = os.ttyname(self._slave)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.device)
        tmp.replace(self.path)  # atomic: a client never sees a half-made port

    async def read(self) -> bytes:
        """Wait for bytes the client wrote."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return os.read(self._master, 4096)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self._master, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(self._master)

    @property
    def is_open(self) -> bool:
        return self._master >= 0

    def write(self, data: bytes) -> int:
        """Send bytes to the client; what a full buffer cannot take is lost, as on a wire.

        Returns how many bytes went out.
        """
        try:
            return os.write(self._master, data)
        except BlockingIOError:
            log.debug("pty buffer full, bytes dropped", extra={"port": str(self.path)})
        except OSError:
            pass  # closed under us (unplugged)
        return 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.path.is_symlink() and os.readlink(self.path) == self.device:
                self.path.unlink()
        for fd in (self._master, self._slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = -1
