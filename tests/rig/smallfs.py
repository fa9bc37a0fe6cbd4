"""A size-capped file system for disk-full tests: a tmpfs mounted in the test's tmp dir.

tmpfs because it needs no image file nor loop device, and because it keeps no
blocks in reserve for root: on ext4 root may write into the 5 % reserved for it,
so a test running as root would not hit ENOSPC where a service user would.

Mounting needs root (CAP_SYS_ADMIN). Without it `small_filesystem` raises
`MountNotPermitted` and the caller decides; `require_small_filesystem` decides
like `require_binary` does for a missing server: skip, but fail under `CI=true`.
The mount is made with mount(2) through ctypes, so the reason is an errno, not
the wording of mount(8)'s message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NoReturn

import pytest

from tests.rig.servers import ci_mode

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2  # umount2: lazy unmount, done once the last user lets go

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class SmallFsError(RuntimeError):
    """Mounting or unmounting the small file system failed; `errno` says why."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(f"{message}: [Errno {err}] {os.strerror(err)}")
        self.errno = err


class MountNotPermitted(SmallFsError):
    """We may not mount here: not root, or root without CAP_SYS_ADMIN (an unprivileged container)."""


@contextmanager
def small_filesystem(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of `size_bytes` (rounded up to whole pages) at `path`; unmount it on exit.

    `path` is created first. If something still uses the file system at exit (a
    process with an open file or its cwd there), the unmount is lazy: `path` is
    detached at once and the memory is freed when the last user lets go.
    """
    path.mkdir(parents=True, exist_ok=True)
    target = os.fsencode(path)
    options = f"size={size_bytes}".encode()
    # The source name shows in /proc/mounts and df: a leaked mount says where it came from.
    if _libc.mount(b"fieldlink-smallfs", target, b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise MountNotPermitted(
                f"cannot mount a tmpfs at {path}: it needs root with CAP_SYS_ADMIN, we run as uid {os.geteuid()}",
                err,
            )
        raise SmallFsError(f"cannot mount a tmpfs of {size_bytes} bytes at {path}", err)
    try:
        yield path
    finally:
        _unmount(path, target)


def skip_or_fail_mount(exc: MountNotPermitted) -> NoReturn:
    """Skip the test on a developer machine; fail it under `CI=true`, which runs as root."""
    if ci_mode():
        pytest.fail(f"{exc} (CI=true: tests that need a mount must not skip)", pytrace=False)
    pytest.skip(str(exc))


@contextmanager
def require_small_filesystem(path: Path, size_bytes: int) -> Iterator[Path]:
    """`small_filesystem`, but a test that may not mount is skipped (failed under `CI=true`)."""
    with ExitStack() as stack:
        try:
            mounted = stack.enter_context(small_filesystem(path, size_bytes))
        except MountNotPermitted as exc:
            skip_or_fail_mount(exc)
        yield mounted


def _unmount(path: Path, target: bytes) -> None:
    if _libc.umount2(target, 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and _libc.umount2(target, MNT_DETACH) == 0:
        return
    raise SmallFsError(f"cannot unmount {path}", ctypes.get_errno())


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave_bytes: int) -> Path:
    """Write a filler file in the directory `path` so that between `leave_bytes` and one block more stay free.

    Returns the filler: delete it to give the space back ("the operator cleaned up").
    Real zeros are written, not a sparse file, which would take no space.
    """
    st = os.statvfs(path)
    block = st.f_frsize
    size = (st.f_bavail * block - leave_bytes) // block * block
    if size < 0:
        raise ValueError(f"{path}: only {st.f_bavail * block} bytes free, cannot leave {leave_bytes}")
    fd, name = tempfile.mkstemp(prefix=".filler-", dir=path)
    zeros = bytes(min(size, 1 << 20))
    with os.fdopen(fd, "wb") as filler:
        for offset in range(0, size, len(zeros) or 1):
            filler.write(zeros[: size - offset])
    return Path(name)
