"""Screenshots for the docs: `python -m app.gui.screenshots OUTDIR`.

Drives the real app at 1280x800 through every wizard page with the bundled SmolLM2 and a sample dataset, then
trains for real to capture the training panel mid-run and the GPU strip. It uses a throw-away library and settings,
so the pictures show what a newcomer sees and nothing of the user's own library is touched or shown.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

WINDOW_SIZE = (1280, 800)
# Small enough that the real SmolLM2 gives a few chart points within minutes on a CPU.
TRAINING_STEPS = 30
BATCH_SIZE = 2
MAX_LEN = 128
POINTS_BEFORE_SHOT = 5


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Run the event loop until `predicate` holds; a QEventLoop rather than a processEvents() spin."""
    from PySide6.QtCore import QEventLoop, QTimer

    deadline = time.monotonic() + timeout_s
    loop = QEventLoop()
    timer = QTimer()
    timer.timeout.connect(lambda: (predicate() or time.monotonic() > deadline) and loop.quit())
    timer.start(20)
    loop.exec()
    timer.stop()
    if not predicate():
        raise SystemExit(f"Gave up after {timeout_s:.0f} s waiting for {what}.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m app.gui.screenshots OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    scratch = Path(tempfile.mkdtemp(prefix="tailor-screenshots-"))

    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.core.library import Library
    from app.gui import settings
    from app.gui.style import apply_style

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(scratch / "settings"))
    app = QApplication(sys.argv[:1])
    app.setOrganizationName(settings.ORGANISATION)
    app.setApplicationName(settings.APPLICATION)
    apply_style(app)

    from app.gui.main_window import MainWindow

    window = MainWindow(Library(scratch / "library"))
    window.resize(*WINDOW_SIZE)
    window.show()
    try:
        take_screenshots(app, window, out)
    finally:
        # Even after a failure, let a run checkpoint and its thread end before Python tears Qt down.
        window.close()
        wait_until(lambda: not window.training_panel.is_running, 300, "the training run to pause")
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def take_screenshots(app, window, out: Path) -> None:
    from app.gui.training_panel import FINISHED

    wizard, panel = window.wizard, window.training_panel

    def shot(name: str, widget=None) -> None:
        app.processEvents()
        path = out / name
        (widget or window).grab().save(str(path))
        print(f"saved {path}")

    wait_until(lambda: window.gpu_strip.latest is not None, 10, "the first GPU/RAM reading")
    shot("main-window.png")
    shot("wizard-1-model.png")

    wizard.next()
    wait_until(lambda: wizard.current_index == 1, 300, "the bundled model to be ready")
    wait_until(lambda: wizard.context.dataset is not None or wizard.data_page.banner.isVisible(), 120,
               "the sample dataset to be read")
    shot("wizard-2-dataset.png")

    wizard.next()
    wait_until(lambda: wizard.current_index == 2, 30, "the adapter page")
    wizard.adapter_page.system_prompt.setPlainText(
        "You are a cheerful pirate. Answer every question in pirate speak, briefly.")
    wizard.adapter_page.advanced_toggle.setChecked(True)
    wizard.adapter_page.batch_size.setValue(BATCH_SIZE)
    wizard.adapter_page.max_len.setValue(MAX_LEN)
    wizard.adapter_page.max_steps.setValue(TRAINING_STEPS)
    wizard.adapter_page.checkpoint_every.setValue(20)
    shot("wizard-3-adapter.png")

    wizard.next()
    wait_until(lambda: wizard.current_index == 3, 30, "the review page")
    shot("wizard-4-review.png")

    wizard.next()
    wait_until(lambda: len(panel.chart.steps) >= POINTS_BEFORE_SHOT, 600, "training progress")
    shot("training-panel-running.png")
    shot("gpu-strip.png", window.gpu_strip)

    panel.stop()
    wait_until(lambda: panel.state == FINISHED and not panel.is_running, 300, "the adapter to be saved")
    shot("training-panel-finished.png")


if __name__ == "__main__":
    sys.exit(main())
