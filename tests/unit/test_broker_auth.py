"""The local broker's rules without a broker: topic filter coverage, filter syntax, the password file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pwdlib.hashers.argon2 import Argon2Hasher

from fieldlink.broker_auth import (
    PasswordFileError,
    check_topic_filter,
    covers,
    read_password_file,
    remove_user,
    set_password,
)


@pytest.mark.parametrize(
    ("allowed", "requested", "expected"),
    [
        ("fl/+/+/dev/+/cmd", "fl/site/gw/dev/pump/cmd", True),
        ("fl/+/+/dev/+/cmd", "fl/site/gw/dev/pump/cmd/result", False),
        ("fl/#", "fl/+", True),
        ("fl/#", "fl", True),  # "a/#" also matches its parent level
        ("fl/+", "fl/#", False),  # amqtt's own ACL plugin lets this one through
        ("fl/+", "fl/a", True),
        ("fl/+", "fl/a/b", False),
        ("fl/a", "fl/+", False),
        ("fl/a/#", "fl/+/x", False),
        ("fl/+/x", "fl/+/x", True),
        ("#", "anything/at/all", True),
        ("lab/+", "lab/#", False),
    ],
)
def test_a_rule_covers_only_what_lies_inside_it(allowed: str, requested: str, expected: bool) -> None:
    assert covers(allowed, requested) is expected


@pytest.mark.parametrize("bad", ["", "fl/#/x", "fl/a#", "fl/a+/b", "a\0b"])
def test_malformed_filters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="must"):
        check_topic_filter(bad)


def test_password_file_entries_verify_and_update(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "users"
    assert set_password(path, "hmi", "one") is True
    assert set_password(path, "scada", "two") is True
    assert set_password(path, "hmi", "three") is False  # changed, not added
    users = read_password_file(path)
    assert sorted(users) == ["hmi", "scada"]
    assert Argon2Hasher().verify("three", users["hmi"])  # what amqtt's FileAuthPlugin checks with
    assert not Argon2Hasher().verify("one", users["hmi"])
    assert path.stat().st_mode & 0o777 == 0o600
    assert remove_user(path, "scada") is True
    assert remove_user(path, "scada") is False
    assert list(read_password_file(path)) == ["hmi"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hmi\n", "line 1: expected USER:HASH"),
        ("# users\nhmi:$6$salt$hash\n", "line 2: user 'hmi' has no Argon2 hash"),
        ("# nobody\n", "has no users"),
    ],
)
def test_password_files_amqtt_could_not_use_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "users"
    path.write_text(text)
    with pytest.raises(PasswordFileError, match=message):
        read_password_file(path)


def test_a_user_listed_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_password(path, "hmi", "one")
    path.write_text(path.read_text() * 2)
    with pytest.raises(PasswordFileError, match="line 2: user 'hmi' is listed twice"):
        read_password_file(path)
