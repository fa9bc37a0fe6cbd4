"""The last health report of a program, written to its state dir when it stops.

Operators (and the demo) read it to see what a stopped gateway or cloud had done:
``cat /var/lib/fieldlink/last-health.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["LAST_HEALTH_FILE", "read_snapshot", "write_snapshot"]

LAST_HEALTH_FILE = "last-health.json"


def write_snapshot(path: Path, body: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)  # readers never see half a file


def read_snapshot(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
