"""The X11 library check that runs before the window opens: fake ldd reports, and the real plugin of this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.gui.display_check import (
    XCB_UTIL_LIBRARIES, check_display, missing_libraries, packages_for, run_ldd, uses_xcb, xcb_plugin_path,
)

REPO = Path(__file__).resolve().parents[2]

# What ldd prints for Qt 6.5+'s libqxcb.so on a fresh Debian desktop (a FAKE report: the paths differ per machine).
FAKE_LDD_FRESH_DEBIAN = """\
\tlinux-vdso.so.1 (0x00007ffd1b5f2000)
\tlibQt6XcbQpa.so.6 => /opt/venv/lib/python3.11/site-packages/PySide6/Qt/lib/libQt6XcbQpa.so.6 (0x00007f2a)
\tlibxkbcommon-x11.so.0 => /lib/x86_64-linux-gnu/libxkbcommon-x11.so.0 (0x00007f2b)
\tlibxcb-cursor.so.0 => not found
\tlibxcb-icccm.so.4 => not found
\tlibxcb-image.so.0 => /lib/x86_64-linux-gnu/libxcb-image.so.0 (0x00007f2c)
\tlibxcb-keysyms.so.1 => not found
\tlibxcb.so.1 => /lib/x86_64-linux-gnu/libxcb.so.1 (0x00007f2d)
\tlibxcb-icccm.so.4 => not found
\tlibxcb-keysyms.so.1 => not found
\tlibwhatever-new.so.3 => not found
"""
X11 = {"DISPLAY": ":0"}


def test_missing_libraries_become_packages_for_debian_and_fedora():
    missing = missing_libraries(FAKE_LDD_FRESH_DEBIAN)
    assert missing == ["libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libwhatever-new.so.3"]
    debian, fedora, unknown = packages_for(missing)
    assert debian == ["libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1"]
    assert fedora == ["xcb-util-cursor", "xcb-util-wm", "xcb-util-keysyms"]
    assert unknown == ["libwhatever-new.so.3"]

    message = check_display(X11, "linux", FAKE_LDD_FRESH_DEBIAN)
    assert "sudo apt install libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1" in message
    assert "sudo dnf install xcb-util-cursor xcb-util-wm xcb-util-keysyms" in message
    assert "libwhatever-new.so.3" in message and "dnf provides" in message


def test_nothing_missing_means_no_message():
    complete = "\n".join(line for line in FAKE_LDD_FRESH_DEBIAN.splitlines() if "not found" not in line)
    assert check_display(X11, "linux", complete) is None
    assert check_display(X11, "linux", "") is None  # ldd said nothing usable: let Qt try


@pytest.mark.parametrize("environ, platform, expected", [
    ({"DISPLAY": ":0"}, "linux", True),
    ({"QT_QPA_PLATFORM": "xcb"}, "linux", True),
    ({"QT_QPA_PLATFORM": "xcb;wayland"}, "linux", True),
    ({"QT_QPA_PLATFORM": "offscreen"}, "linux", False),
    ({"QT_QPA_PLATFORM": "offscreen:configfile=/tmp/screen.json"}, "linux", False),
    ({"QT_QPA_PLATFORM": "wayland"}, "linux", False),
    ({"QT_QPA_PLATFORM": "wayland;xcb"}, "linux", False),
    ({"WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "wayland", "DISPLAY": ":0"}, "linux", False),
    ({"DISPLAY": ":0"}, "win32", False),
    ({"DISPLAY": ":0"}, "darwin", False),
])
def test_the_check_runs_only_where_qt_will_use_xcb(environ, platform, expected):
    assert uses_xcb(environ, platform) is expected
    if not expected:
        assert check_display(environ, platform, FAKE_LDD_FRESH_DEBIAN) is None


def test_the_real_plugin_of_this_machine():
    """The real ldd on PySide6's real libqxcb.so: whatever it reports missing is what the message names."""
    if not sys.platform.startswith("linux") or run_ldd(xcb_plugin_path()) is None:
        pytest.skip("needs Linux with ldd")
    report = run_ldd(xcb_plugin_path())
    missing = missing_libraries(report)
    message = check_display(X11, "linux")
    if not missing:
        assert message is None
    else:
        assert all(library in message for library in missing)


def test_the_app_exits_2_with_the_message_instead_of_a_qt_abort():
    """Start the real app with the xcb platform. Where libraries are missing (this machine lacks libxcb-icccm4 and
    libxcb-keysyms1) it must exit 2 with the install command; Qt would otherwise abort with SIGABRT."""
    if not missing_libraries(run_ldd(xcb_plugin_path()) or ""):
        pytest.skip("every library the xcb plugin needs is installed here")
    environ = {**os.environ, "QT_QPA_PLATFORM": "xcb", "DISPLAY": ":99"}
    result = subprocess.run([sys.executable, "-m", "app"], capture_output=True, text=True, cwd=REPO, env=environ,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert "sudo apt install" in result.stderr and "sudo dnf install" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_frozen_build_carries_only_the_xcb_util_family():
    assert "libxcb-cursor.so.0" in XCB_UTIL_LIBRARIES and "libxkbcommon-x11.so.0" in XCB_UTIL_LIBRARIES
    assert not {"libxcb.so.1", "libX11.so.6", "libGL.so.1", "libxcb-randr.so.0"} & set(XCB_UTIL_LIBRARIES)
