"""Before the window opens on Linux/X11: does Qt's xcb platform plugin have the system libraries it links to?

Since Qt 6.5 the xcb plugin needs xcb-cursor, and it always needed a handful of xcb-util libraries that a fresh
desktop install may lack. Without them Qt prints "could not load the Qt platform plugin xcb … no Qt platform plugin
could be initialized" and aborts the process (SIGABRT, a core dump, no Python exception to catch). This module asks
the dynamic linker first (`ldd` on the plugin, which lists every library it cannot find as "not found") and turns
the answer into the packages to install, so `make run` can say what to do instead of crashing.

No Qt platform is created here; only QtCore is imported, to find the plugin.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

EXIT_MISSING_LIBRARIES = 2

# Library file name -> (Debian/Ubuntu package, Fedora package) for what the xcb plugin links to.
XCB_PACKAGES: dict[str, tuple[str, str]] = {
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil"),
    "libxcb-util.so.1": ("libxcb-util1", "xcb-util"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon"),
    "libxcb-randr.so.0": ("libxcb-randr0", "libxcb"),
    "libxcb-shape.so.0": ("libxcb-shape0", "libxcb"),
    "libxcb-shm.so.0": ("libxcb-shm0", "libxcb"),
    "libxcb-sync.so.1": ("libxcb-sync1", "libxcb"),
    "libxcb-xfixes.so.0": ("libxcb-xfixes0", "libxcb"),
    "libxcb-render.so.0": ("libxcb-render0", "libxcb"),
    "libxcb-xkb.so.1": ("libxcb-xkb1", "libxcb"),
    "libxcb-xinerama.so.0": ("libxcb-xinerama0", "libxcb"),
    "libxcb-glx.so.0": ("libxcb-glx0", "libxcb"),
    "libxcb.so.1": ("libxcb1", "libxcb"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb"),
    "libX11.so.6": ("libx11-6", "libX11"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl"),
    "libGL.so.1": ("libgl1", "libglvnd-glx"),
    "libOpenGL.so.0": ("libopengl0", "libglvnd-opengl"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig"),
    "libfreetype.so.6": ("libfreetype6", "freetype"),
    "libdbus-1.so.3": ("libdbus-1-3", "dbus-libs"),
    "libglib-2.0.so.0": ("libglib2.0-0", "glib2"),
}
XCB_UTIL_LIBRARIES = tuple(name for name in XCB_PACKAGES if name.startswith(("libxcb-", "libxkbcommon")) and
                           XCB_PACKAGES[name][1] != "libxcb")
"""The xcb-util family (and xkbcommon): small, stable ABIs that a frozen build can carry itself. libxcb, libX11 and
the GL libraries are not in it: they must be the system's own, matching its X server and graphics driver."""
NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found\s*$", re.MULTILINE)
NON_X11_PLATFORMS = ("offscreen", "minimal", "wayland", "eglfs", "linuxfb", "vnc", "vkkhrdisplay")


def uses_xcb(environ=None, platform: str | None = None) -> bool:
    """Whether Qt will try the xcb (X11) plugin: Linux, and no other platform asked for or preferred."""
    environ = os.environ if environ is None else environ
    if not (platform or sys.platform).startswith("linux"):
        return False
    requested = environ.get("QT_QPA_PLATFORM", "").strip().lower()
    if requested:
        # "wayland;xcb" tries Wayland first; only a list that starts with xcb is an xcb start.
        return requested.split(";")[0].split(":")[0] == "xcb"
    # Qt 6 prefers Wayland in a Wayland session and falls back to xcb only when that fails.
    return not (environ.get("WAYLAND_DISPLAY") and environ.get("XDG_SESSION_TYPE", "").lower() == "wayland")


def xcb_plugin_path() -> Path:
    from PySide6.QtCore import QLibraryInfo

    return Path(QLibraryInfo.path(QLibraryInfo.LibraryPath.PluginsPath)) / "platforms" / "libqxcb.so"


def run_ldd(library: Path) -> str | None:
    """ldd's report on `library`, or None when ldd is missing or fails (then nothing can be said)."""
    ldd = shutil.which("ldd")
    if ldd is None or not library.is_file():
        return None
    try:
        result = subprocess.run([ldd, str(library)], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def missing_libraries(ldd_output: str) -> list[str]:
    """The libraries ldd could not find, each once, in its order."""
    return list(dict.fromkeys(NOT_FOUND.findall(ldd_output)))


def packages_for(missing: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(Debian/Ubuntu packages, Fedora packages, libraries of unknown package) for the missing libraries."""
    debian, fedora, unknown = [], [], []
    for library in missing:
        if library in XCB_PACKAGES:
            debian_package, fedora_package = XCB_PACKAGES[library]
            debian += [debian_package] if debian_package not in debian else []
            fedora += [fedora_package] if fedora_package not in fedora else []
        else:
            unknown.append(library)
    return debian, fedora, unknown


def explain(missing: list[str]) -> str:
    """Plain words: what is missing, and the command that installs it on Debian/Ubuntu and on Fedora."""
    debian, fedora, unknown = packages_for(missing)
    lines = ["Tailor cannot open its window: the X11 display needs system libraries that are not installed:",
             "  " + ", ".join(missing), ""]
    if debian:
        lines += ["Install them, then start Tailor again:",
                  f"  Debian/Ubuntu:  sudo apt install {' '.join(debian)}",
                  f"  Fedora:         sudo dnf install {' '.join(fedora)}"]
    if unknown:
        lines += [f"Your distribution's package manager can tell which package provides {', '.join(unknown)}"
                  " (apt-file search NAME, or dnf provides '*/NAME')."]
    lines += ["", "The command line works without them: tailor --help"]
    return "\n".join(lines)


def check_display(environ=None, platform: str | None = None, ldd_output: str | None = None) -> str | None:
    """None when the window can open as far as can be checked, else the message to show before exiting with 2.

    ldd_output stands in for running ldd on the plugin (tests).
    """
    if not uses_xcb(environ, platform):
        return None
    if ldd_output is None:
        ldd_output = run_ldd(xcb_plugin_path())
    if not ldd_output:
        return None  # nothing to go on: let Qt try
    missing = missing_libraries(ldd_output)
    return explain(missing) if missing else None
