"""Fixtures of the test rig: real servers on 127.0.0.1, on ports picked at run time.

Each fixture starts a private server in the test's tmp dir (its log file is
there too: `<tmp_path>/<server>/<server>.log`) and stops it at teardown by its
own process handle, never by name: other sessions on this machine run their
own mosquitto and victoria-metrics.

A missing server binary skips the test with the Debian package to install,
except under `CI=true`, where it fails the test: CI must never go green by
skipping the tests that need a server.

Scope: every server fixture is function-scoped. victoria-metrics starts in
~0.1 s and stops in a few ms, so a fresh store per test costs little and no
test can see another's samples (or its duplicates).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rig import Mosquitto, SmtpSink, VictoriaMetrics, ci_mode, log_tail
from tests.rig.programs import Programs


@pytest.fixture(name="ci_mode")
def ci_mode_fixture() -> bool:
    """True under `CI=true`: a missing server fails instead of skipping."""
    return ci_mode()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started private mosquitto with persistence; `stop()`/`start()` keep its port and data."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """A started private victoria-metrics with an empty store."""
    store = VictoriaMetrics(tmp_path / "victoria-metrics")
    store.start()
    yield store
    store.stop()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A started SMTP server that keeps every message it accepts."""
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[Programs]:
    """Starts our own programs as processes; whatever still runs at teardown gets SIGTERM."""
    with Programs(tmp_path / "programs").session() as started:
        yield started


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, attach the log tail of every server the test used to the report."""
    report = yield
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            paths = [getattr(value, "log_path", None), *getattr(value, "log_paths", [])]
            for log_path in paths:
                if isinstance(log_path, Path):
                    report.sections.append((f"{name} log ({log_path})", log_tail(log_path)))
    return report
