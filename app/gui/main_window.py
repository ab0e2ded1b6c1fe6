"""The main window: the one place that builds the app's parts and wires them together.

Three places to work (Train: wizard and training panel; Library; Chat) in tabs, the GPU strip always visible below
them. Closing the window during a run pauses it (checkpoint saved) and the next start offers to resume it.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QFrame, QHBoxLayout, QLabel, QMainWindow, QPushButton, QStackedWidget, QTabWidget, QVBoxLayout, QWidget,
)

from app.core.config import RunConfig
from app.core.errors import TailorError
from app.core.gpu import GpuMonitor
from app.core.library import Library
from app.core.paths import library_home
from app.core.training import discard_interrupted_run, interrupted_run_progress
from app.gui import settings
from app.gui.chat_pane import ChatPane
from app.gui.gpu_strip import GpuStrip
from app.gui.library_panel import LibraryPanel
from app.gui.report_card import close_report_cards, open_report_card
from app.gui.style import app_icon, repolish
from app.gui.training_panel import TrainingPanel
from app.gui.wizard import TrainingWizard

DEFAULT_SIZE = (1280, 800)


class InterruptedRunsBar(QFrame):
    """'“pirate” stopped at step 40 of 100 — Resume / Discard' for each run that never finished (crash, kill, pause)."""

    resume_requested = Signal(str)

    def __init__(self, library: Library, parent: QWidget | None = None):
        super().__init__(parent)
        self.library = library
        self.setObjectName("banner")
        self.setProperty("tone", "warning")
        self._rows = QVBoxLayout(self)
        self._rows.setContentsMargins(10, 6, 10, 6)
        self._rows.setSpacing(4)
        self.refresh()

    def refresh(self, exclude: str | None = None) -> None:
        """List the unfinished runs again; `exclude` is the one the training panel is already showing as paused."""
        while self._rows.count():
            row = self._rows.takeAt(0).layout()
            while row.count():
                row.takeAt(0).widget().deleteLater()
        runs = [name for name in self.library.interrupted_runs() if name != exclude]
        for name in runs:
            self._rows.addLayout(self._row(name))
        self.setVisible(bool(runs))
        repolish(self)

    def _row(self, name: str) -> QHBoxLayout:
        step, total = interrupted_run_progress(self.library, name)
        # Every run checkpoints step 0 (so out-of-memory recovery always has a place to go back to): nothing to lose.
        where = f"at step {step} of {total}" if step else "before its first checkpoint (it restarts from the start)"
        text = QLabel(f"<b>“{name}” did not finish</b>: it stopped {where}.")
        resume = QPushButton("Resume")
        resume.clicked.connect(lambda: self.resume_requested.emit(name))
        discard = QPushButton("Discard")
        discard.setToolTip("<p>Delete this run's checkpoint; the dataset and settings are not touched.</p>")
        discard.clicked.connect(lambda: self._discard(name))
        row = QHBoxLayout()
        row.addWidget(text, 1)
        row.addWidget(resume)
        row.addWidget(discard)
        return row

    def _discard(self, name: str) -> None:
        discard_interrupted_run(self.library, name)
        self.refresh()


class MainWindow(QMainWindow):
    def __init__(self, library: Library | None = None, gpu_monitor: GpuMonitor | None = None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.library = library or Library(library_home())
        self._close_when_idle = False
        self.setWindowTitle("Tailor")
        self.setWindowIcon(app_icon())

        self.wizard = TrainingWizard(self.library)
        self.training_panel = TrainingPanel(self.library)
        self.interrupted_runs = InterruptedRunsBar(self.library)
        self.train_stack = QStackedWidget()
        self.train_stack.addWidget(self.wizard)
        self.train_stack.addWidget(self.training_panel)
        train_area = QWidget()
        train_layout = QVBoxLayout(train_area)
        train_layout.setContentsMargins(8, 8, 8, 0)
        train_layout.setSpacing(4)
        train_layout.addWidget(self.interrupted_runs)
        train_layout.addWidget(self.train_stack, 1)

        self.library_panel = LibraryPanel(self.library)
        self.chat_pane = ChatPane(self.library)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(train_area, "Train")
        self.tabs.addTab(self.library_panel, "Library")
        self.tabs.addTab(self.chat_pane, "Chat")

        self.gpu_strip = GpuStrip(gpu_monitor)
        separator = QFrame()
        separator.setFrameShape(QFrame.Shape.HLine)
        separator.setStyleSheet("color: #dde1e6;")
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.tabs, 1)
        layout.addWidget(separator)
        layout.addWidget(self.gpu_strip)
        self.setCentralWidget(central)
        self.statusBar().showMessage(f"Library: {self.library.root}")

        self.gpu_strip.snapshot_received.connect(self.wizard.update_snapshot)
        self.wizard.train_requested.connect(self.start_training)
        self.wizard.page_entered.connect(self._wizard_page_entered)
        self.interrupted_runs.resume_requested.connect(self.resume_training)
        self.training_panel.running_changed.connect(self._running_changed)
        self.training_panel.running_changed.connect(self.chat_pane.set_training_active)
        self.training_panel.training_gpu.connect(self.gpu_strip.set_training_device)
        self.training_panel.adapter_ready.connect(self._adapter_ready)
        self.training_panel.chat_requested.connect(self.open_chat)
        self.training_panel.new_run_requested.connect(self.show_wizard)
        self.library_panel.open_in_chat.connect(self.open_chat)
        self._restore()

    # Remembering

    def _restore(self) -> None:
        geometry = settings.read_bytes(settings.GEOMETRY)
        if geometry is None or not self.restoreGeometry(geometry):
            self.resize(*DEFAULT_SIZE)
        self.tabs.setCurrentIndex(int(settings.read_text(settings.CURRENT_TAB, "0") or 0))
        last_run = settings.read_text(settings.LAST_RUN)
        if last_run:
            try:
                self.wizard.restore(RunConfig.from_json(last_run))
            except TailorError:
                pass  # written by another version, or edited by hand: the defaults are a fine start

    def _save(self) -> None:
        settings.write_bytes(settings.GEOMETRY, self.saveGeometry())
        settings.write_text(settings.CURRENT_TAB, str(self.tabs.currentIndex()))

    # Training

    def start_training(self, config: RunConfig) -> None:
        settings.write_text(settings.LAST_RUN, config.to_json())
        self.train_stack.setCurrentWidget(self.training_panel)
        self.training_panel.start(config)

    def _wizard_page_entered(self, page) -> None:
        if page is self.wizard.review_page:
            # Build the charts while the user reads the review, not in the moment the run starts.
            self.training_panel.chart.build_now()

    def resume_training(self, name: str) -> None:
        if self.training_panel.is_running:
            self.statusBar().showMessage("One training at a time: wait for the current run, or pause it.", 5000)
            return
        self.tabs.setCurrentIndex(0)
        self.train_stack.setCurrentWidget(self.training_panel)
        self.training_panel.resume(name)
        self.interrupted_runs.refresh()

    def show_wizard(self) -> None:
        self.train_stack.setCurrentWidget(self.wizard)
        self.wizard.restart()
        self.interrupted_runs.refresh()  # a run left paused in the panel is offered here from now on

    def _running_changed(self, running: bool) -> None:
        self.wizard.set_training_allowed(not running)
        if running:
            self.interrupted_runs.hide()
            return
        self.interrupted_runs.refresh(exclude=self.training_panel.paused_run)
        if self._close_when_idle:
            self.close()

    def _adapter_ready(self, name: str) -> None:
        self.library_panel.refresh()
        self.statusBar().showMessage(f"“{name}” was added to the library.", 10000)
        # The new persona's report card: how it compares with its base, computed while the user looks.
        card = open_report_card(self.library, name, evaluate=True)
        card.card_saved.connect(self.library_panel.refresh)

    def open_chat(self, name: str) -> None:
        self.tabs.setCurrentWidget(self.chat_pane)
        self.chat_pane.open_persona(name)

    # Closing

    def closeEvent(self, event) -> None:
        self._save()
        if self.training_panel.pause_for_exit():
            # The run checkpoints first; the window closes itself when the worker is done (see _running_changed).
            self._close_when_idle = True
            self.statusBar().showMessage("Pausing the training run so it can be resumed next time…")
            event.ignore()
            return
        self.gpu_strip.stop()
        self.chat_pane.shutdown()
        close_report_cards()
        super().closeEvent(event)
