"""The last health report of a program, written to its state dir when it stops.

Operators (and the demo) read it to see what a stopped gateway or cloud had done:
``cat /var/lib/fieldlink/last-health.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["LAST_HEALTH_FILE", "read_snapshot", "write_snapshot"]

LAST_HEALTH_FILE = "last-health.json"

log = logging.getLogger(__name__)


def write_snapshot(path: Path, body: dict[str, Any]) -> None:
    """Write it atomically; a full disk is logged, not raised (a stop or reload must go on)."""
    partial = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(partial, path)  # readers never see half a file
    except OSError as exc:
        log.error("could not write the health snapshot", extra={"path": str(path), "error": str(exc)})
        with contextlib.suppress(OSError):
            partial.unlink()


def read_snapshot(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
