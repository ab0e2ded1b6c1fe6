"""Does the Dataset page stay responsive with 50,000 examples in its editor?

Opens the real main window (offscreen), picks the bundled SmolLM2's tokenizer on the Model page, loads a 50,000-row
chat JSONL on the Dataset page, and then does what a user does with a big file: scroll to the end, filter the
duplicates, edit a reply, delete and add an example, undo, filter again, and Save as…. A 10 ms precise QTimer ticks
on the GUI thread throughout; a late tick is an event-loop stall (work on the GUI thread, or a worker holding the GIL).
Each step is reported with its own worst stall, including the background checks (token counts, duplicates) the
edits start.

Reference, measured in the same run: the same 50,000 rows put into a QTableWidget (one QTableWidgetItem per cell,
what a page that "just shows the rows" does), the standard Qt widget for a table. Target: no stall over 100 ms.

    python bench/dataset_editor_stall.py [--rows 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TICK_MS = 10
STALL_TARGET_MS = 100
IDLE = "idle: nothing to do (this machine's noise)"


def write_dataset(path: Path, rows: int) -> None:
    """The pirate sample's conversations, varied so rows differ, with one in fifty repeated (duplicates to find)."""
    samples = [json.loads(line)["messages"] for line in (REPO / "resources" / "datasets" / "pirate.jsonl").read_text().splitlines()]
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(rows):
            source = index - 1 if index % 50 == 49 else index
            messages = [dict(m) for m in samples[source % len(samples)]]
            messages[0]["content"] = f"({source}) {messages[0]['content']}"
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


class StallClock:
    """A precise timer on the GUI thread; `phase` names what the app was doing when each tick came."""

    def __init__(self):
        from PySide6.QtCore import QElapsedTimer, Qt, QTimer

        self.clock = QElapsedTimer()
        self.clock.start()
        self.ticks: list[tuple[float, str]] = []
        self.phase = "start"
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.timeout.connect(self.tick)
        self.timer.start(TICK_MS)

    def tick(self) -> None:
        self.ticks.append((self.clock.nsecsElapsed() / 1e6, self.phase))

    def stalls(self) -> dict[str, list[float]]:
        """Per phase: how late each tick came (the gap beyond the 10 ms period), charged to the later tick's phase."""
        found: dict[str, list[float]] = {}
        for (earlier, _), (later, phase) in zip(self.ticks, self.ticks[1:]):
            found.setdefault(phase, []).append(max(0.0, later - earlier - TICK_MS))
        return found


def summary(stalls: list[float]) -> str:
    ordered = sorted(stalls)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0
    return (f"ticks {len(stalls):6d}   max stall {max(stalls, default=0):6.1f} ms   p99 {p99:5.1f} ms   "
            f"median {statistics.median(stalls) if stalls else 0:4.1f} ms")


def run_steps(rows: int, scratch: Path) -> tuple[dict[str, list[float]], dict[str, float]]:
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication, QTableWidget, QTableWidgetItem

    from app.core.library import Library
    from app.gui.screenshots import wait_until
    from app.gui.style import apply_style

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(scratch / "settings"))
    app = QApplication.instance() or QApplication([])
    apply_style(app)
    from app.gui.main_window import MainWindow

    dataset = scratch / "big.jsonl"
    write_dataset(dataset, rows)
    window = MainWindow(Library(scratch / "library"))
    window.resize(1280, 800)
    window.show()
    wizard = window.wizard
    wizard.next()
    wait_until(lambda: wizard.current_index == 1, 600, "the bundled model's tokenizer")
    page = wizard.data_page
    wait_until(lambda: not page.is_busy, 600, "the sample dataset")
    editor, model = page.editor, page.editor.model
    walls: dict[str, float] = {}
    clock = StallClock()

    def step(name: str, action, until=lambda: True, timeout_s: float = 600) -> None:
        clock.phase = name
        started = time.perf_counter()
        action()
        wait_until(until, timeout_s, name)
        walls[name] = time.perf_counter() - started

    idle_until = time.perf_counter() + 3
    step(IDLE, lambda: None, lambda: time.perf_counter() > idle_until)
    step(f"load {rows:,} rows (tokenise on a worker)", lambda: page.set_path(str(dataset)),
         lambda: page.context.dataset is not None and page.context.dataset.path == str(dataset) and not page.is_busy)
    step("first check (duplicates, report)", lambda: None, lambda: editor.report is not None and not editor.is_busy)

    def scroll_to_end() -> None:
        bar = editor.table.verticalScrollBar()
        while model.canFetchMore() or bar.value() < bar.maximum():
            bar.setValue(bar.maximum())
            app.processEvents()

    step("scroll to the last row", scroll_to_end)
    step("filter: duplicates", lambda: editor.filter.setCurrentIndex(editor.filter.findData("duplicates")))
    duplicates_shown = model.rowCount()
    step("filter: all", lambda: editor.filter.setCurrentIndex(editor.filter.findData("all")))

    def edit() -> None:
        editor.table.selectRow(10)
        from app.gui.dataset_editor import ASSISTANT

        model.setData(model.index(10, ASSISTANT), "Arr, a reply the user rewrote by hand, matey.")

    step("edit a reply (+ background recheck)", edit, lambda: not editor.is_busy)
    step("delete an example (+ recheck)", lambda: (editor.table.selectRow(5), editor.delete_selected()),
         lambda: not editor.is_busy)
    step("add an example (+ recheck)", editor.add_example, lambda: not editor.is_busy)
    step("undo twice (+ recheck)", lambda: (model.undo_stack.undo(), model.undo_stack.undo()), lambda: not editor.is_busy)
    step("delete all duplicates (+ recheck)", lambda: (
        editor.filter.setCurrentIndex(editor.filter.findData("duplicates")), editor.table.selectAll(),
        editor.delete_selected(), editor.filter.setCurrentIndex(editor.filter.findData("all"))),
         lambda: not editor.is_busy)
    saved = scratch / "edited.jsonl"
    step("Save as… (worker) and reload", lambda: editor.save_to(str(saved)),
         lambda: page.context.dataset is not None and page.context.dataset.path == str(saved) and not page.is_busy)
    remaining = page.context.dataset.report.rows

    # The reference: the standard widget filled with every row on the GUI thread.
    conversations = list(page.context.dataset.loaded.conversations)
    reference = QTableWidget()
    reference.resize(900, 500)
    reference.show()

    def fill_reference() -> None:
        reference.setColumnCount(3)
        reference.setRowCount(len(conversations))
        for row, messages in enumerate(conversations):
            reference.setItem(row, 0, QTableWidgetItem(messages[0]["content"]))
            reference.setItem(row, 1, QTableWidgetItem(messages[1]["content"] if len(messages) > 1 else ""))
            reference.setItem(row, 2, QTableWidgetItem(str(len(messages))))

    step("REFERENCE: QTableWidget filled with the rows", fill_reference)
    clock.timer.stop()
    window.close()
    from app.gui.workers import wait_for_all_jobs

    wait_for_all_jobs(120_000)  # the check the reload started: no thread may be running when the app goes
    walls["_duplicates_shown"] = duplicates_shown
    walls["_rows_after"] = remaining
    return clock.stalls(), walls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    scratch = Path(tempfile.mkdtemp(prefix="tailor-bench-editor-"))
    os.environ["TAILOR_HOME"] = str(scratch / "library")

    print(f"Dataset page with {args.rows:,} chat examples; a {TICK_MS} ms precise QTimer ticks on the GUI thread.")
    stalls, walls = run_steps(args.rows, scratch)
    ours = [s for phase, values in stalls.items() if not phase.startswith(("REFERENCE", "idle")) for s in values]
    for phase, values in stalls.items():
        wall = walls.get(phase)
        print(f"  {phase:45s} {summary(values)}" + (f"   ({wall:5.1f} s)" if wall is not None else ""))
    worst = max(ours, default=0.0)
    reference = max(stalls.get("REFERENCE: QTableWidget filled with the rows", [0.0]))
    print(f"\n  duplicates filter showed {walls['_duplicates_shown']:,} rows; {walls['_rows_after']:,} rows saved after deleting them")
    print(f"  editor, all steps: max stall {worst:.1f} ms (target <= {STALL_TARGET_MS} ms); idle baseline "
          f"{max(stalls.get(IDLE, [0.0])):.1f} ms")
    print(f"  reference QTableWidget: max stall {reference:.1f} ms  →  the editor's worst stall is "
          f"{reference / max(worst, 0.1):.1f}x shorter")
    print("\nPASS" if worst <= STALL_TARGET_MS else "\nOUTSIDE TARGET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
