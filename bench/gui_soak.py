"""GUI soak: open and close the chat, library and training views 200 times each; Qt objects and threads must come
back to the count they had after a short warm-up.

Each cycle builds each view on a real library (two persona adapters), shows it, lets Qt paint and run its timers,
then closes it the way the main window does (the chat pane's shutdown, close, deleteLater) and flushes deferred
deletes. Counted after every cycle: live widgets (QApplication.allWidgets), Python-side QObject wrappers (gc),
Python threads and the process's OS threads. The reference, in the same run, is a bare QWidget with a layout and a
label opened and closed the same way: the per-view open+close time is printed as a ratio to it.

    QT_QPA_PLATFORM=offscreen python bench/gui_soak.py [--cycles 200]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

WARMUP = 10


def counts(app) -> dict[str, int]:
    import psutil
    from PySide6.QtCore import QCoreApplication, QEvent, QObject

    for _ in range(3):  # deleteLater chains (a widget whose children schedule their own deletes) need a few rounds
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        app.processEvents()
        gc.collect()
    return {"widgets": len(app.allWidgets()),
            "qobjects": sum(1 for item in gc.get_objects() if isinstance(item, QObject)),
            "threads": threading.active_count(), "os_threads": psutil.Process().num_threads()}


def open_and_close(app, make) -> float:
    started = time.perf_counter()
    view = make()
    view.resize(900, 600)
    view.show()
    for _ in range(3):
        app.processEvents()
    if hasattr(view, "shutdown"):
        view.shutdown()
    view.close()
    view.deleteLater()
    app.processEvents()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    args = parser.parse_args()

    from adapter_factory import make_random_adapters
    from PySide6.QtWidgets import QApplication, QLabel, QVBoxLayout, QWidget

    from app.core.library import Library
    from app.core.models import resolve_base
    from app.gui.chat_pane import ChatPane
    from app.gui.library_panel import LibraryPanel
    from app.gui.training_panel import TrainingPanel

    def bare() -> QWidget:
        widget = QWidget()
        QVBoxLayout(widget).addWidget(QLabel("reference"))
        return widget

    app = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory(prefix="tailor-gui-soak-") as folder:
        library = Library(Path(folder) / "library")
        base = resolve_base("default").folder
        make_random_adapters(library, base, ["pirate"], system_prompt="You are a pirate.")
        make_random_adapters(library, base, ["butler"], system_prompt="You are a butler.", seed=1)
        views = {"chat": lambda: ChatPane(library), "library": lambda: LibraryPanel(library),
                 "training": lambda: TrainingPanel(library), "reference (bare QWidget)": bare}
        timings: dict[str, list[float]] = {name: [] for name in views}
        history = []
        start = None
        for cycle in range(args.cycles):
            for name, make in views.items():
                timings[name].append(open_and_close(app, make))
            history.append(counts(app))
            if cycle + 1 == WARMUP:
                start = history[-1]
        end = history[-1]
        peak = {key: max(entry[key] for entry in history[WARMUP:]) for key in end}

    reference = statistics.median(timings["reference (bare QWidget)"])
    print(f"GUI soak: {args.cycles} open/close cycles of each view (offscreen)")
    for name, values in timings.items():
        print(f"  {name:26s} median {statistics.median(values) * 1000:7.1f} ms per open+close "
              f"({statistics.median(values) / reference:6.1f}x the bare QWidget)")
    for key in end:
        print(f"  {key:10s} after warm-up {start[key]:6d}, peak {peak[key]:6d}, at the end {end[key]:6d}")
    checks = {
        "live widgets back at the warm-up count": end["widgets"] <= start["widgets"],
        "QObject wrappers back at the warm-up count": end["qobjects"] <= start["qobjects"],
        "Python threads back at the warm-up count": end["threads"] <= start["threads"],
        "OS threads back at the warm-up count": end["os_threads"] <= start["os_threads"],
    }
    for check, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAIL'}] {check}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
