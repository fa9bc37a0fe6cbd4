"""Runs a program's main coroutine on uvloop when available, and turns a crash into a log line and exit 1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["run_async"]


def run_async(main: Coroutine[Any, Any, None], log: logging.Logger) -> int:
    try:
        import uvloop  # noqa: PLC0415 (optional: Linux only)
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main)
    except KeyboardInterrupt:
        return 130
    except Exception:
        # A crash is never silent: one line with the traceback, and a non-zero exit for systemd.
        log.exception("fatal error; exiting")
        return 1
    return 0
