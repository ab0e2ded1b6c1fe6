"""What every wizard page shares: a title, a message banner, a progress line for background work, and validation.

A page never opens a dialog to complain: bad input becomes a message in its banner, with the hint that says what to
do. Slow work (converting a model, scanning a dataset) runs as a Job while the page shows what it is doing.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QProgressBar, QVBoxLayout, QWidget

from app.core.catalogue import ModelShape
from app.core.data import DatasetReport, LoadedDataset
from app.core.gpu import SystemSnapshot
from app.core.library import Library
from app.gui.style import repolish
from app.gui.workers import Failure, Job, run_function


@dataclass(frozen=True)
class ModelInfo:
    """A base model ready to train on: resolved to a local folder, with its tokenizer and shape."""

    source: str
    """What goes into ModelSource.base ('default', a catalogue key, a folder, a .gguf file, a hub id)."""
    display_name: str
    model_id: str
    folder: Path
    shape: ModelShape
    tokenizer: Any


@dataclass(frozen=True)
class DatasetInfo:
    """A validated dataset and what the dataset page shows about it."""

    path: str
    format: str
    """The format asked for ('auto' or an override), which is what the run config records."""
    prompt_column: str | None
    response_column: str | None
    loaded: LoadedDataset
    report: DatasetReport
    segments: list[tuple[str, bool]]
    """The first example rendered through the chat template, as (text, trained) pieces."""
    tokenizer: Any
    """The tokenizer the lengths were counted with: a different base model means counting again."""


@dataclass
class WizardContext:
    """What the pages have established so far; each page fills in its part as it validates."""

    library: Library
    model: ModelInfo | None = None
    dataset: DatasetInfo | None = None
    snapshot: SystemSnapshot | None = None
    """The GPU strip's latest reading: free VRAM (or RAM) for the memory review, without calling NVML here."""


class Banner(QFrame):
    """A message on the page: an error with its fix, a warning, or a note. Hidden while empty."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("banner")
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextFormat(Qt.TextFormat.RichText)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(10, 6, 10, 6)
        layout.addWidget(self.label)
        self.plain_text = ""  # the message without markup, for tests and accessibility
        self.hide()

    def show_message(self, message: str, hint: str | None = None, tone: str = "error") -> None:
        lines = html.escape(message).replace("\n", "<br>")
        text = f"<b>{lines}</b>" if tone in ("error", "warning") else lines
        if hint:
            text += f"<br>{html.escape(hint)}"
        self.label.setText(text)
        self.plain_text = f"{message}\n{hint}" if hint else message
        self.setProperty("tone", tone)
        repolish(self)
        self.show()

    def clear(self) -> None:
        self.plain_text = ""
        self.label.clear()
        self.hide()


class BusyLine(QWidget):
    """'Converting the model…' with an indeterminate bar, while a page's job runs."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.label = QLabel()
        self.label.setObjectName("muted")
        self.bar = QProgressBar()
        self.bar.setRange(0, 0)
        self.bar.setFixedWidth(160)
        self.bar.setFixedHeight(12)
        self.bar.setTextVisible(False)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar)
        layout.addWidget(self.label, 1)
        self.hide()

    def start(self, text: str) -> None:
        self.label.setText(text)
        self.show()

    def update_text(self, text: object) -> None:
        if isinstance(text, str):
            self.label.setText(text)

    def stop(self) -> None:
        self.hide()


class WizardPage(QWidget):
    """Subclasses fill `self.body` and override `validate()`, or `advance()` when moving on needs a job first."""

    title = ""
    subtitle = ""

    def __init__(self, context: WizardContext, parent: QWidget | None = None):
        super().__init__(parent)
        self.context = context
        self._job: Job | None = None
        self._pending_advance: Callable[[], None] | None = None
        title = QLabel(self.title)
        title.setObjectName("pageTitle")
        subtitle = QLabel(self.subtitle)
        subtitle.setObjectName("pageSubtitle")
        subtitle.setWordWrap(True)
        self.banner = Banner()
        self.busy = BusyLine()
        self.body = QWidget()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(16, 12, 16, 8)
        layout.setSpacing(8)
        layout.addWidget(title)
        layout.addWidget(subtitle)
        layout.addWidget(self.banner)
        layout.addWidget(self.busy)
        layout.addWidget(self.body, 1)

    # Navigation hooks

    def enter(self) -> None:
        """Called each time the page is shown."""

    def validate(self) -> str | None:
        """A message saying what is wrong, or None when the page is complete."""
        return None

    def advance(self, proceed: Callable[[], None]) -> None:
        """Move on by calling `proceed` once the page is valid; while a job runs, once it has succeeded."""
        if self.is_busy:
            self._pending_advance = proceed
            return
        problem = self.validate()
        if problem:
            self.banner.show_message(problem)
        else:
            proceed()

    # Background work

    @property
    def is_busy(self) -> bool:
        return self._job is not None

    def run_job(self, function: Callable[[Callable[[object], None]], Any], status: str,
                on_success: Callable[[Any], None], on_failure: Callable[[Failure], None] | None = None) -> None:
        """Run `function(report)` on a worker thread; the callbacks run on the GUI thread."""
        self.banner.clear()
        self.busy.start(status)
        job = run_function(function)
        self._job = job
        job.event.connect(self.busy.update_text)
        job.succeeded.connect(on_success)
        job.failed.connect(lambda failure: self._job_failed(failure, on_failure or self.show_failure))
        job.finished.connect(lambda: self._job_ended(job))

    def _job_failed(self, failure: Failure, handler: Callable[[Failure], None]) -> None:
        self._pending_advance = None  # the user must see what went wrong before moving on
        handler(failure)

    def _job_ended(self, job: Job) -> None:
        if self._job is not job:
            return
        self._job = None
        self.busy.stop()
        if self._pending_advance is not None:
            proceed, self._pending_advance = self._pending_advance, None
            self.advance(proceed)

    def show_failure(self, failure: Failure) -> None:
        self.banner.show_message(failure.message, failure.hint)
