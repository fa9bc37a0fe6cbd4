"""Log lines: key=value and JSON renderings of a record and its extra fields, without leaking secrets."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from fieldlink.logs import JsonFormatter, KeyValueFormatter, setup_logging

LEAK_CANARY = "s3cr3t-t0ken"  # a secret value that must never show up in a line
MASK = "*" * 10


def _fail() -> None:
    raise RuntimeError("broker gone")


def make_record(
    msg: str, *args: object, level: int = logging.INFO, extra: dict[str, Any] | None = None, exc: bool = False
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            _fail()
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.getLogger("x").makeRecord("x", level, __file__, 1, msg, args, exc_info, extra=extra)
    record.created, record.msecs = 0.0, 123.0  # 1970-01-01T00:00:00.123Z
    return record


def kv(msg: str, *args: object, **options: Any) -> str:
    return KeyValueFormatter().format(make_record(msg, *args, **options))


def as_json(msg: str, *args: object, **options: Any) -> dict[str, Any]:
    line = JsonFormatter().format(make_record(msg, *args, **options))
    assert "\n" not in line
    return json.loads(line)


# --- key=value ----------------------------------------------------------------------------


def test_kv_line() -> None:
    line = kv("two words", extra={"key": "value"})
    assert line == 'ts=1970-01-01T00:00:00.123Z level=info logger=x msg="two words" key=value'


def test_kv_levels_and_plain_messages() -> None:
    assert kv("started", level=logging.WARNING) == "ts=1970-01-01T00:00:00.123Z level=warning logger=x msg=started"
    assert kv("x", level=logging.ERROR).split()[1] == "level=error"
    assert kv("x", level=logging.DEBUG).split()[1] == "level=debug"


def test_kv_message_arguments_are_merged() -> None:
    assert kv("polled %d devices", 3).endswith('msg="polled 3 devices"')


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("boiler-1", "boiler-1"),
        (42, "42"),
        (1.5, "1.5"),
        (None, "None"),
        ("connection refused", '"connection refused"'),
        ("a=b", '"a=b"'),
        ("", '""'),
        ('say "hi"', '"say \\"hi\\""'),
        ("line\nbreak", '"line\\nbreak"'),
        ("tab\there", '"tab\\there"'),
        ("Kessel-ü", "Kessel-ü"),
        ("Störung läuft", '"Störung läuft"'),
    ],
)
def test_kv_quotes_values_that_need_it(value: object, rendered: str) -> None:
    assert kv("m", extra={"field": value}).endswith(f" field={rendered}")


def test_kv_quoted_values_read_back_as_json_strings() -> None:
    value = 'he said "a = b"\nthen left'
    rendered = kv("m", extra={"field": value}).split(" field=", 1)[1]
    assert json.loads(rendered) == value


def test_kv_fields_keep_their_order() -> None:
    line = kv("device offline", extra={"device": "boiler-1", "reason": "timeout", "attempt": 3})
    assert line.endswith('msg="device offline" device=boiler-1 reason=timeout attempt=3')


def test_kv_exception_is_one_quoted_field() -> None:
    line = kv("failed", exc=True)
    assert "\n" not in line
    exc = line.split(" exc=", 1)[1]
    assert exc.startswith('"Traceback')
    assert "RuntimeError: broker gone" in json.loads(exc)


# --- JSON ---------------------------------------------------------------------------------


def test_json_line_has_the_extra_fields() -> None:
    body = as_json("two words", extra={"key": "value", "count": 3, "ratio": 0.5, "ok": True, "none": None})
    assert body == {
        "ts": "1970-01-01T00:00:00.123Z",
        "level": "info",
        "logger": "x",
        "msg": "two words",
        "key": "value",
        "count": 3,
        "ratio": 0.5,
        "ok": True,
        "none": None,
    }


def test_json_renders_unknown_types_as_text() -> None:
    body = as_json("m", extra={"path": Path("/var/lib/fieldlink/buffer.db"), "names": ["a", "b"]})
    assert body["path"] == "/var/lib/fieldlink/buffer.db"
    assert body["names"] == ["a", "b"]


def test_json_keeps_non_ascii_and_exceptions() -> None:
    body = as_json("Störung", extra={"device": "Kessel-ü"}, exc=True)
    assert (body["msg"], body["device"]) == ("Störung", "Kessel-ü")
    assert "RuntimeError: broker gone" in body["exc"]


# --- secrets ------------------------------------------------------------------------------


class _StoreConfig(BaseModel):
    url: str
    token: SecretStr


def test_secret_str_never_leaks_in_kv() -> None:
    line = kv(
        "connecting", extra={"token": SecretStr(LEAK_CANARY), "config": _StoreConfig(url="http://x", token=LEAK_CANARY)}
    )
    assert LEAK_CANARY not in line
    assert f" token={MASK} " in line


def test_secret_str_never_leaks_in_json() -> None:
    token = SecretStr(LEAK_CANARY)
    line = JsonFormatter().format(
        make_record("connecting", extra={"token": token, "config": _StoreConfig(url="http://x", token=LEAK_CANARY)})
    )
    assert LEAK_CANARY not in line
    assert json.loads(line)["token"] == MASK


def test_secret_str_never_leaks_through_message_arguments() -> None:
    assert LEAK_CANARY not in kv("token is %s", SecretStr(LEAK_CANARY))
    assert as_json("token is %s", SecretStr(LEAK_CANARY))["msg"] == f"token is {MASK}"


# --- setup_logging ------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {
        name: logging.getLogger(name).level for name in ("amqtt", "transitions", "asyncio", "aiosmtpd", "mail.log")
    }
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, level in noisy.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_setup_logging_writes_one_line_per_event_to_stderr(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("warning", fmt)  # type: ignore[arg-type]
    log = logging.getLogger("fieldlink.test")
    log.info("not shown")
    log.warning("device offline", extra={"device": "boiler-1"})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    if fmt == "json":
        assert json.loads(lines[0])["device"] == "boiler-1"
    else:
        assert lines[0].endswith('level=warning logger=fieldlink.test msg="device offline" device=boiler-1')
    assert logging.getLogger("amqtt").getEffectiveLevel() >= logging.WARNING
