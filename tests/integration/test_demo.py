"""`make demo` in miniature: the demo runs every part as a process and ends with a JSON summary."""

from __future__ import annotations

import json
import re
import subprocess
from email import message_from_bytes, policy
from pathlib import Path

from tests.rig.programs import BIN

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"


def test_demo_summary_counts_every_record_and_the_alert_mail(tmp_path: Path) -> None:
    # boiler-1's ramp crosses the 80 degC threshold about 10 s after the simulator starts.
    result = subprocess.run(
        [BIN / "firmware-sim", "demo", "--duration", "14", "--configs", str(CONFIGS), "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["records_lost"] == 0
    assert summary["points_stored"] > 0
    assert summary["records_stored"] == summary["records_buffered"] == summary["records_delivered"]
    assert summary["readings_published"] == summary["records_buffered"]
    assert summary["messages_left_in_buffer"] == 0
    assert summary["alerts_fired"] >= 1
    assert summary["emails_sent"] >= 1
    assert summary["exit_codes"] == {"gateway": 0, "cloud": 0}
    mails = sorted(Path(summary["mail_folder"]).glob("*.eml"))
    first = message_from_bytes(mails[0].read_bytes(), policy=policy.default)
    assert first["Subject"].startswith("[FIRING critical] boiler-overheat: demo-plant/gw-demo/boiler-1 temperature = ")
    assert "| stored " in result.stderr  # the live status line
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/$", result.stderr, re.M)  # the live page's URL
