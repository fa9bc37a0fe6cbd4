"""Who may use an embedded broker: its password file, and topic rules per user.

The password file is amqtt's own format (what its ``FileAuthPlugin`` reads): one
``user:hash`` line per user, ``#`` comments, and the hash an Argon2 PHC string
(``$argon2id$v=19$m=...``). ``fieldlink-gateway passwd FILE USER`` writes entries.

This module imports no broker code, so that config checks stay light; the amqtt
plugins that enforce these rules live in :mod:`fieldlink.embedded_broker`.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PasswordFileError",
    "TopicRules",
    "check_topic_filter",
    "covers",
    "hash_password",
    "read_password_file",
    "remove_user",
    "set_password",
]

# OWASP's minimum for Argon2id (19 MiB, 2 passes, 1 lane): about 40 ms per check on a PC
# and a few times that on a Raspberry Pi. argon2-cffi's default (64 MiB, 3 passes, 4 lanes)
# costs ~200 ms on a PC, and the broker checks a password at every connect.
ARGON2_TIME_COST = 2
ARGON2_MEMORY_KIB = 19456
ARGON2_PARALLELISM = 1

_ARGON2 = re.compile(r"^\$argon2(id|i|d)\$(v=\d+\$)?m=\d+,t=\d+,p=\d+\$[^$]+\$[^$]+$")
_USER = re.compile(r"^[^\s:#]+$")


class PasswordFileError(ValueError):
    """A password file that cannot be read or used; the message says where."""


@dataclass(frozen=True)
class TopicRules:
    """What one user may do: publish to topics matching ``publish``, subscribe within ``subscribe``."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()


def check_topic_filter(value: str) -> str:
    """An MQTT topic filter: ``+`` alone in a level, ``#`` alone in the last one."""
    if not value:
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError(f"must not contain NUL, got {value!r}")
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be a whole level and the last one, got {value!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level, got {value!r}")
    return value


def covers(allowed: str, requested: str) -> bool:
    """True if every topic that ``requested`` (a topic or a filter) matches is matched by ``allowed``.

    amqtt's own ACL plugin compares level by level and lets ``fl/#`` through where only
    ``fl/+`` is allowed; a subscription must not reach further than its rule.
    """
    wanted = requested.split("/")
    for i, level in enumerate(allowed.split("/")):
        if level == "#":
            return True  # also matches the parent level itself: "a/#" matches "a"
        if i >= len(wanted) or wanted[i] == "#":
            return False
        if level != "+" and level != wanted[i]:
            return False  # a literal level; a requested "+" reaches further than it
    return len(wanted) == len(allowed.split("/"))


# --- the password file -------------------------------------------------------------------


def read_password_file(path: Path) -> dict[str, str]:
    """User -> hash; raises PasswordFileError naming the line of any entry amqtt could not use."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PasswordFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PasswordFileError(f"{path} is not UTF-8 text") from None
    except ValueError as exc:  # a NUL in the path
        raise PasswordFileError(f"cannot read {path!r}: {exc}") from None
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not _USER.match(user):
            raise PasswordFileError(f"{path} line {number}: expected USER:HASH")
        if not _ARGON2.match(hashed):
            raise PasswordFileError(
                f"{path} line {number}: user {user!r} has no Argon2 hash "
                "(write entries with: fieldlink-gateway passwd FILE USER)"
            )
        if user in users:
            raise PasswordFileError(f"{path} line {number}: user {user!r} is listed twice")
        users[user] = hashed
    if not users:
        raise PasswordFileError(f"{path} has no users: no client could log in")
    return users


def hash_password(password: str) -> str:
    """An Argon2id PHC string that amqtt's FileAuthPlugin verifies."""
    from pwdlib.hashers.argon2 import Argon2Hasher  # noqa: PLC0415 (only the passwd command needs it)

    hasher = Argon2Hasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB, parallelism=ARGON2_PARALLELISM)
    return hasher.hash(password)


def set_password(path: Path, user: str, password: str) -> bool:
    """Add ``user`` or replace its hash, keeping every other line; True if the user was new."""
    if not _USER.match(user):
        raise PasswordFileError(f"user name {user!r} must not be empty or contain ':', '#' or spaces")
    if not password:
        raise PasswordFileError("the password must not be empty")
    entry = f"{user}:{hash_password(password)}"
    lines = _lines(path)
    found = False
    for i, line in enumerate(lines):
        if line.split(":", 1)[0].strip() == user and not line.lstrip().startswith("#"):
            lines[i], found = entry, True
    if not found:
        lines.append(entry)
    _write_private(path, lines)
    return not found


def remove_user(path: Path, user: str) -> bool:
    """Remove ``user``'s line; False if it was not there."""
    lines = _lines(path)
    kept = [line for line in lines if line.lstrip().startswith("#") or line.split(":", 1)[0].strip() != user]
    if len(kept) == len(lines):
        return False
    _write_private(path, kept)
    return True


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise PasswordFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def _write_private(path: Path, lines: Sequence[str]) -> None:
    """Write atomically, readable by the owner only (hashes are still worth guessing at)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("".join(f"{line}\n" for line in lines))
        with contextlib.suppress(FileNotFoundError):
            # An operator who opened it to a group (the service's) keeps that.
            os.chmod(partial, path.stat().st_mode & 0o777)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
