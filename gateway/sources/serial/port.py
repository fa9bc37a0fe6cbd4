"""The pyserial adapter: open and configure a port, read it from asyncio, turn failures into ours.

pyserial opens the device and sets its line settings (termios); reading bypasses
pyserial's blocking ``read``: the file descriptor is non-blocking and the task
waits for readability with ``loop.add_reader``, the way asyncio's own
``sock_recv`` does. No thread per port, a cancelled read leaves nothing behind,
and data stays in the kernel's buffer while the consumer is busy (backpressure).
Serial rates (at most some kB/s) make the register/unregister per wait negligible.

A vanished port (USB adapter unplugged, pty master closed) shows as a read error
(EIO) or as readability with no data (hangup); both raise :class:`PortLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import termios

import serial

from gateway.sources.serial.config import SerialConfig

__all__ = ["PortError", "PortLost", "PortUnavailable", "SerialPort"]

READ_SIZE = 4096

_PARITY = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}
_STOPBITS = {1: serial.STOPBITS_ONE, 1.5: serial.STOPBITS_ONE_POINT_FIVE, 2: serial.STOPBITS_TWO}
_BYTESIZE = {5: serial.FIVEBITS, 6: serial.SIXBITS, 7: serial.SEVENBITS, 8: serial.EIGHTBITS}


class PortError(Exception):
    """Base of the serial port's failures; the message is the reason shown as device state."""


class PortUnavailable(PortError):
    """The port could not be opened (missing, busy, permission denied)."""


class PortLost(PortError):
    """An open port stopped working (unplugged, hung up)."""


class SerialPort:
    def __init__(self, handle: serial.Serial) -> None:
        self._handle = handle
        self._fd = handle.fileno()
        os.set_blocking(self._fd, False)
        # pyserial leaves VMIN=0 (its reads time out by select), where a read without data
        # returns b"" like a hangup; with VMIN=1 it raises EAGAIN and b"" means hung up.
        attributes = termios.tcgetattr(self._fd)
        attributes[6][termios.VMIN], attributes[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self._fd, termios.TCSANOW, attributes)

    @classmethod
    def open(cls, config: SerialConfig) -> SerialPort:
        """Open and configure the port; input that waited in the driver is discarded."""
        try:
            handle = serial.Serial(
                port=config.port,
                baudrate=config.baudrate,
                bytesize=_BYTESIZE[config.bytesize],
                parity=_PARITY[config.parity],
                stopbits=_STOPBITS[config.stopbits],
                timeout=0,
                exclusive=True,  # flock: a second reader would steal half the bytes
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise PortUnavailable(_reason(exc)) from None
        try:
            return cls(handle)
        except (OSError, termios.error) as exc:
            handle.close()
            raise PortUnavailable(_reason(exc)) from None

    async def read(self) -> bytes:
        """The next bytes that arrive (at least one); PortLost if the port went away."""
        while True:
            try:
                data = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                await self._readable()
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                raise PortLost(f"read failed: {_reason(exc)}") from None
            if not data:
                raise PortLost("port hung up (device disconnected?)")
            return data

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():  # the loop may report readiness again before this task runs
                ready.set_result(None)

        loop.add_reader(self._fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(self._fd)

    def close(self) -> None:
        # Closing a vanished device can fail; the descriptor is released anyway.
        with contextlib.suppress(serial.SerialException, OSError):
            self._handle.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{exc.strerror or name} ({name})"
    # pyserial wraps OSError: "[Errno 2] could not open port /dev/ttyUSB0: [Errno 2] No such file ..."
    return str(exc)
