"""The PyInstaller one-folder build: it builds from build.spec, and the frozen app passes its own self-test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A cold build on two busy cores takes a quarter of an hour; the self-test a minute or two more.
BUILD_TIMEOUT_S = 3600
SELF_TEST_TIMEOUT_S = 900


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + SELF_TEST_TIMEOUT_S)
def test_frozen_app_builds_and_passes_its_self_test(tmp_path):
    pytest.importorskip("PyInstaller", reason="install the packaging extra: pip install -e '.[package]'")
    started = time.monotonic()
    build = subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--distpath", str(tmp_path / "dist"),
                            "--workpath", str(tmp_path / "build"), str(REPO / "build.spec")],
                           cwd=REPO, timeout=BUILD_TIMEOUT_S, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-5000:]
    build_s = time.monotonic() - started
    app = tmp_path / "dist" / "tailor"
    size_mb = sum(f.stat().st_size for f in app.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6
    print(f"\nBuilt {app} in {build_s:.0f} s: {size_mb:.0f} MB")
    if sys.platform.startswith("linux"):
        data_home = tmp_path / "xdg"
        subprocess.run([str(app / "install-desktop-entry.sh")], env={**os.environ, "XDG_DATA_HOME": str(data_home)}, check=True)
        entry = (data_home / "applications" / "tailor.desktop").read_text()
        assert f'Exec="{app / "tailor-gui"}"' in entry and "Icon=tailor" in entry
        assert (data_home / "icons" / "hicolor" / "scalable" / "apps" / "tailor.svg").is_file()

    # Nothing from the source tree or the virtual environment may leak in: run from elsewhere, with a bare PATH. An
    # empty cache makes the frozen app convert its bundled GGUF model, as it does on a user's first start.
    (tmp_path / "home").mkdir()
    environment = {"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                   "TAILOR_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([str(app / "tailor-gui"), "--self-test"], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=SELF_TEST_TIMEOUT_S)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("[ok] main window: 'Tailor'", "[ok] ML stack: torch", "[ok] 4-bit training: 2 steps in NF4", "Self-test passed"):
        assert check in result.stdout
