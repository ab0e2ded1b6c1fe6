"""The chat pane's "Serve to other apps" switch: `tailor serve` started and stopped from the desktop app.

Loading the model and stopping the server both take time, so each runs as a Job on its own QThread; the switch
is disabled while one is under way. While serving, the panel shows the URL, the models served, and client
examples (Python `openai`, curl) with Copy buttons. The server serves the base the chat has chosen, sharing the
chat's loaded model (app.gui.shared_session): the base is in memory once, and the chat keeps going beside it. It
listens on this computer only (127.0.0.1).
"""

from __future__ import annotations

from typing import Callable

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QCheckBox, QGroupBox, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QSpinBox, QTabWidget, QVBoxLayout, QWidget,
)

from app.core.chat import BASE
from app.core.library import Library
from app.gui.failures import Failure
from app.gui.shared_session import shared_sessions
from app.gui.style import BAD, MUTED
from app.gui.workers import Job, run_function
from app.server.runner import DEFAULT_HOST, DEFAULT_PORT, BackgroundServer
from app.server.snippets import curl_snippet, python_snippet

OFF_TEXT = "Off. Turn on to use your personas from other apps (OpenAI-compatible API on this computer)."


class ServePanel(QGroupBox):
    state_changed = Signal(str)
    """'starting', 'serving', 'stopping' or 'off'."""

    def __init__(self, library: Library, chosen_base: Callable[[], tuple[str, str]], parent: QWidget | None = None):
        super().__init__(parent)
        self.library = library
        self._chosen_base = chosen_base
        self._sessions = shared_sessions()
        self.server: BackgroundServer | None = None
        self._job: Job | None = None

        self.switch = QCheckBox("Serve to other apps")
        self.switch.setToolTip("Answer OpenAI chat requests from other programs on this computer (Open WebUI, editor "
                               "plugins, your scripts); the request's 'model' picks the persona. Serves the chat's "
                               "base model, loaded once for both.")
        self.port = QSpinBox(minimum=1024, maximum=65535, value=DEFAULT_PORT, prefix="port ")
        self.status = QLabel(OFF_TEXT)
        self.status.setWordWrap(True)
        self.status.setStyleSheet(f"color: {MUTED}")
        self.python_box, self.curl_box = _snippet_box(), _snippet_box()
        self.snippets = QTabWidget()
        self.copy_buttons: list[QPushButton] = []
        for box, title in ((self.python_box, "Python (openai)"), (self.curl_box, "curl")):
            page = QWidget()
            column = QVBoxLayout(page)
            column.setContentsMargins(4, 4, 4, 4)
            copy = QPushButton("Copy")
            copy.clicked.connect(lambda _=False, box=box: QGuiApplication.clipboard().setText(box.toPlainText()))
            self.copy_buttons.append(copy)
            buttons = QHBoxLayout()
            buttons.addStretch(1)
            buttons.addWidget(copy)
            column.addWidget(box)
            column.addLayout(buttons)
            self.snippets.addTab(page, title)
        self.snippets.setVisible(False)

        row = QHBoxLayout()
        row.addWidget(self.switch)
        row.addWidget(self.port)
        row.addWidget(self.status, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 4, 8, 4)
        layout.addLayout(row)
        layout.addWidget(self.snippets)
        self.switch.toggled.connect(self._toggled)

    @property
    def url(self) -> str | None:
        return self.server.url + "/v1" if self.server else None

    # Starting and stopping, each on a worker thread

    @Slot(bool)
    def _toggled(self, on: bool) -> None:
        if on and self.server is None:
            self._start()
        elif not on and self.server is not None:
            self._stop()

    def _start(self) -> None:
        base, quant = self._chosen_base()
        port = self.port.value()
        self._busy("starting", f"Starting on {DEFAULT_HOST}:{port}: loading the model and personas…")
        self._job = run_function(lambda report: self._serve(base, quant, port, report))
        self._job.event.connect(lambda message: self._show(str(message)))
        self._job.succeeded.connect(self._started)
        self._job.failed.connect(self._start_failed)

    def _serve(self, base: str, quant: str, port: int, report) -> BackgroundServer:
        """On the job's thread: the server, on the chat's shared session (loaded here if the chat has none yet)."""
        def open_session():
            return self._sessions.open((str(self.library.root), base, quant), lambda: BackgroundServer.load_session(
                self.library, base, quant, report), self)

        try:
            return BackgroundServer.start(self.library, base, quant, DEFAULT_HOST, port, progress=report,
                                          open_session=open_session)
        except BaseException:
            self._sessions.close(self)
            raise

    def _stop(self) -> None:
        server, self.server = self.server, None
        self._busy("stopping", "Stopping the server…")

        def stop(report) -> None:
            server.stop()
            self._sessions.close(self)

        self._job = run_function(stop)
        self._job.finished.connect(self._stopped)

    @Slot(object)
    def _started(self, server: BackgroundServer) -> None:
        self.server = server
        names = server.model_names()
        persona = next((name for name in names if name != BASE), BASE)
        self.python_box.setPlainText(python_snippet(self.url.removesuffix("/v1"), persona))
        self.curl_box.setPlainText(curl_snippet(self.url.removesuffix("/v1"), persona))
        self.snippets.setVisible(True)
        self._show(f"<b>Serving at <a href='{self.url}'>{self.url}</a></b> &nbsp;models: {', '.join(names)}", rich=True)
        self._ready("serving")

    @Slot(object)
    def _start_failed(self, failure: Failure) -> None:
        self.switch.blockSignals(True)
        self.switch.setChecked(False)
        self.switch.blockSignals(False)
        self._show(f"Could not start: {failure.message}" + (f" {failure.hint}" if failure.hint else ""), colour=BAD)
        self._ready("off")

    @Slot()
    def _stopped(self) -> None:
        self.snippets.setVisible(False)
        self._show(OFF_TEXT)
        self._ready("off")

    def shutdown(self) -> None:
        """At exit: stop serving and wait for a start or stop in progress (a running QThread must not be destroyed)."""
        if self._job is not None:
            self._job.wait(60_000)
        if self.server is not None:
            self.server.stop()
            self.server = None
            self._sessions.close(self)

    # Showing

    def _busy(self, state: str, text: str) -> None:
        self.switch.setEnabled(False)
        self.port.setEnabled(False)
        self._show(text)
        self.state_changed.emit(state)

    def _ready(self, state: str) -> None:
        self._job = None
        self.switch.setEnabled(True)
        self.port.setEnabled(state == "off")
        self.state_changed.emit(state)

    def _show(self, text: str, colour: str = MUTED, rich: bool = False) -> None:
        self.status.setTextFormat(Qt.TextFormat.RichText if rich else Qt.TextFormat.PlainText)
        self.status.setOpenExternalLinks(rich)
        self.status.setStyleSheet(f"color: {colour}" if not rich else "")
        self.status.setText(text)


def _snippet_box() -> QPlainTextEdit:
    box = QPlainTextEdit(readOnly=True)
    box.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
    box.setMaximumHeight(110)
    box.setStyleSheet("font-family: monospace")
    return box
