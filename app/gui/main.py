"""Entry point of the desktop app: `python -m app`, or the `tailor-gui` script.

`--measure-startup` prints how long the window took to first paint (from process creation, so interpreter start and
imports count) and whether torch or transformers had been imported by then, then exits: bench/gui_responsiveness.py
uses it to check that the app opens fast and leaves the ML stack for later.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import psutil
from PySide6.QtCore import QEvent, QObject, QTimer
from PySide6.QtWidgets import QApplication

from app.gui import settings
from app.gui.display_check import EXIT_MISSING_LIBRARIES, check_display
from app.gui.style import apply_style, apply_style_sheet

EXIT_WAIT_MS = 60_000
"""At exit, how long to wait for a run that is writing its pause checkpoint (a big model takes a while)."""


def process_age_s() -> float:
    """Seconds since this process was created. psutil's create_time rests on a boot time rounded to whole seconds,
    so on Linux the kernel's own clock ticks are read instead (10 ms resolution)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # Field 22 is the start time in clock ticks after boot; the command name before it may contain spaces.
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - psutil.Process().create_time()


class FirstPaintProbe(QObject):
    """Reports the first paint of a window, then closes it (closing, not quitting, so its threads stop cleanly)."""

    def __init__(self):
        super().__init__()
        self.report: dict | None = None

    def eventFilter(self, watched, event) -> bool:
        if event.type() == QEvent.Type.Paint and self.report is None:
            self.report = {
                "first_paint_ms": round(process_age_s() * 1000),
                "torch_imported": "torch" in sys.modules,
                "transformers_imported": "transformers" in sys.modules,
            }
            print(json.dumps(self.report), flush=True)
            QTimer.singleShot(0, watched.close)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tailor-gui", description="Tailor: fine-tune persona adapters on your PC.")
    parser.add_argument("--measure-startup", action="store_true",
                        help="print the milliseconds to first paint as JSON and exit")
    # The window starts its own executable with this to run a training in a child process; here rather than in a
    # separate entry point so that source runs and frozen builds (whatever their entry script) both have it.
    parser.add_argument("--training-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.training_process:
        from app.gui import training_process

        return training_process.main()

    # Qt aborts the process when its X11 plugin cannot load; say which packages are missing instead.
    problem = check_display()
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_MISSING_LIBRARIES

    app = QApplication(sys.argv[:1])
    app.setOrganizationName(settings.ORGANISATION)
    app.setApplicationName(settings.APPLICATION)
    app.setApplicationDisplayName("Tailor")
    apply_style(app, style_sheet=False)

    from app.gui.main_window import MainWindow
    from app.gui.workers import wait_for_all_jobs

    window = MainWindow()
    apply_style_sheet(app)
    if args.measure_startup:
        probe = FirstPaintProbe()
        window.installEventFilter(probe)
    window.show()
    code = app.exec()
    wait_for_all_jobs(EXIT_WAIT_MS)
    return code
