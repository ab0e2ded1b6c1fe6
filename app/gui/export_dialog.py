"""Export one adapter: pick a format and a destination, watch it being written, then open the folder it is in.

The export runs as a job on its own thread (a merged model takes a while to load, merge and save), reporting each
step to the progress bar. An existing destination is only replaced after the user says so.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QUrl, Signal, Slot
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QComboBox, QDialog, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QMessageBox, QProgressBar,
    QPushButton, QVBoxLayout, QWidget,
)

from app.core.export import (
    FOLDER_FORMATS, FORMATS, default_export_name, destination_taken, export_adapter, export_destination,
)
from app.core.library import Library
from app.core.share import ShareProgress
from app.gui.wizard.base import Banner
from app.gui.workers import Failure, FunctionWorker, Job

DESCRIPTIONS = {
    "peft": "The adapter as peft saves it (adapter_config.json, adapter_model.safetensors) with a model card. "
            "Loads in peft and transformers on top of the base model the card names.",
    "bundle": "One .tailor file for someone else's Tailor library: the adapter, its manifest, system prompt, chat "
              "template, a few sample conversations and checksums of every file.",
    "merged": "A complete model with the adapter built into its full-precision weights, as big as the base model. "
              "Loads in plain transformers; no peft needed.",
    "gguf": "A LoRA adapter for llama.cpp (--lora) and Ollama (ADAPTER in a Modelfile), applied on top of the base "
            "model's own GGUF file.",
}
FILE_FILTERS = {"bundle": "Tailor bundles (*.tailor)", "gguf": "GGUF files (*.gguf)"}


class ExportDialog(QDialog):
    exported = Signal(str)
    """The path written, once an export has finished."""

    def __init__(self, library: Library, adapter_name: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.library = library
        self.adapter_name = adapter_name
        self._job: Job | None = None
        self._exported_to: Path | None = None
        self.setWindowTitle(f"Export “{adapter_name}”")
        self.setMinimumWidth(560)

        self.format_combo = QComboBox()
        for key, label in FORMATS.items():
            self.format_combo.addItem(label, key)
        self.description = QLabel()
        self.description.setObjectName("muted")
        self.description.setWordWrap(True)
        self.destination = QLineEdit()
        self.browse_button = QPushButton("Browse…")
        self.browse_button.clicked.connect(self._browse)
        destination_row = QHBoxLayout()
        destination_row.addWidget(self.destination, 1)
        destination_row.addWidget(self.browse_button)
        form = QFormLayout()
        form.addRow("Format", self.format_combo)
        form.addRow("", self.description)
        form.addRow("Save to", destination_row)

        self.status = QLabel()
        self.status.setObjectName("muted")
        self.progress = QProgressBar()
        self.progress.setTextVisible(False)
        self.progress.hide()
        self.banner = Banner()
        self.export_button = QPushButton("Export")
        self.export_button.setObjectName("primary")
        self.export_button.setDefault(True)
        self.export_button.clicked.connect(self.start_export)
        self.open_folder_button = QPushButton("Open folder")
        self.open_folder_button.hide()
        self.open_folder_button.clicked.connect(self._open_folder)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.reject)
        buttons = QHBoxLayout()
        buttons.addWidget(self.open_folder_button)
        buttons.addStretch(1)
        buttons.addWidget(self.close_button)
        buttons.addWidget(self.export_button)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.banner)
        layout.addWidget(self.status)
        layout.addWidget(self.progress)
        layout.addLayout(buttons)

        self.format_combo.currentIndexChanged.connect(self._format_changed)
        self._format_changed()

    @property
    def format(self) -> str:
        return self.format_combo.currentData()

    @property
    def running(self) -> bool:
        return self._job is not None

    def _format_changed(self) -> None:
        self.description.setText(DESCRIPTIONS[self.format])
        # Keep the folder the user chose, but name the file or folder for the new format.
        current = Path(self.destination.text().strip() or Path.home() / "placeholder")
        self.destination.setText(str(current.parent / default_export_name(self.format, self.adapter_name)))

    def _browse(self) -> None:
        current = self.destination.text().strip()
        if self.format in FOLDER_FORMATS:
            folder = QFileDialog.getExistingDirectory(self, "Export into which folder?", str(Path(current).parent))
            chosen = str(Path(folder) / default_export_name(self.format, self.adapter_name)) if folder else ""
        else:
            # Replacing is asked once, by start_export, whichever way the path was typed or picked.
            chosen, _ = QFileDialog.getSaveFileName(self, "Export as", current, FILE_FILTERS[self.format],
                                                    options=QFileDialog.Option.DontConfirmOverwrite)
        if chosen:
            self.destination.setText(chosen)

    @Slot()
    def start_export(self) -> None:
        if self.running:
            return
        self.banner.clear()
        self._exported_to = None
        text = self.destination.text().strip()
        if not text:
            self.banner.show_message("Choose where to save the export.")
            return
        format_key, target = self.format, export_destination(self.format, self.adapter_name, text)
        force = destination_taken(target)
        if force and QMessageBox.question(
                self, "Replace it?", f"{target} already exists.\n\nReplace it with this export?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                QMessageBox.StandardButton.No) != QMessageBox.StandardButton.Yes:
            return

        def export(report) -> Path:
            return export_adapter(self.library, self.adapter_name, format_key, target, force=force, progress=report)

        self._set_running(True)
        self._job = Job(FunctionWorker(export))
        self._job.event.connect(self._show_progress)
        self._job.succeeded.connect(self._succeeded)
        self._job.failed.connect(self._failed)
        self._job.finished.connect(lambda: self._set_running(False))
        self._job.start()

    def _set_running(self, running: bool) -> None:
        if not running:
            self._job = None
        for widget in (self.export_button, self.close_button, self.format_combo, self.destination, self.browse_button):
            widget.setEnabled(not running)
        self.progress.setVisible(running or self._exported_to is not None)
        if running:
            self.open_folder_button.hide()
            self.progress.setRange(0, 0)

    def _show_progress(self, step: ShareProgress) -> None:
        self.status.setText(step.message)
        self.progress.setRange(0, max(step.total, 1))
        self.progress.setValue(step.done)

    def _succeeded(self, path: Path) -> None:
        self._exported_to = path
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.banner.show_message(f"Exported to {path}", tone="success")
        self.status.clear()
        self.open_folder_button.show()
        self.exported.emit(str(path))

    def _failed(self, failure: Failure) -> None:
        self.progress.hide()
        self.status.clear()
        self.banner.show_message(failure.message, failure.hint)

    def _open_folder(self) -> None:
        if self._exported_to is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self._exported_to.parent)))

    def reject(self) -> None:
        # An export has no way to stop half-way; the dialog stays open until it ends, so its outcome is seen.
        if self.running:
            self.status.setText("Please wait: the export finishes first.")
            return
        super().reject()
