"""deploy/install.sh into a throwaway root: exactly the expected files, a second run changes
nothing, an existing config is never overwritten, and systemd accepts the units."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.rig.servers import require_binary

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "install.sh"
PREFIX = REPO / ".venv"  # an existing virtualenv, used as it is (--no-venv): the units point at its programs

EXPECTED = {
    "etc/fieldlink/gateway.toml": 0o644,
    "etc/fieldlink/cloud.toml": 0o644,
    "etc/fieldlink/gateway.env": 0o600,
    "etc/fieldlink/cloud.env": 0o600,
    "etc/systemd/system/fieldlink-gateway.service": 0o644,
    "etc/systemd/system/fieldlink-cloud.service": 0o644,
}


def _install(root: Path) -> str:
    result = subprocess.run(
        ["bash", str(SCRIPT), "--root", str(root), "--prefix", str(PREFIX), "--no-venv"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def _snapshot(root: Path) -> dict[str, tuple[int, bytes, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mode & 0o777, p.read_bytes(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_install_lays_out_the_files_and_a_second_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _install(root)
    first = _snapshot(root)
    assert {name: mode for name, (mode, _, _) in first.items()} == EXPECTED
    assert first["etc/fieldlink/gateway.toml"][1] == (REPO / "configs" / "gateway.toml").read_bytes()
    unit = first["etc/systemd/system/fieldlink-gateway.service"][1].decode()
    assert f"ExecStart={PREFIX}/bin/fieldlink-gateway run --config /etc/fieldlink/gateway.toml" in unit
    assert "/opt/fieldlink" not in unit

    output = _install(root)
    assert _snapshot(root) == first  # contents, modes and mtimes
    assert "kept" in output
    assert "wrote" not in output


def test_an_existing_config_is_never_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = root / "etc" / "fieldlink" / "gateway.toml"
    config.parent.mkdir(parents=True)
    config.write_text("# mine\n")
    _install(root)
    assert config.read_text() == "# mine\n"
    assert (root / "etc" / "fieldlink" / "cloud.toml").exists()


def test_systemd_accepts_the_installed_units(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", "systemd")  # a failure under CI=true, else a skip
    root = tmp_path / "root"
    _install(root)
    units = sorted(str(p) for p in (root / "etc" / "systemd" / "system").glob("*.service"))
    result = subprocess.run(
        [analyze, "verify", *units],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
