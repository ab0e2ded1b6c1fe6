"""The export dialog: an export on its worker thread with progress, and a question before anything is replaced."""

from __future__ import annotations

import zipfile

import pytest
from adapter_factory import make_random_adapters
from PySide6.QtWidgets import QMessageBox

from app.gui.export_dialog import ExportDialog

EXPORT_TIMEOUT_MS = 60_000


@pytest.fixture
def dialog(qtbot, library, tiny_base):
    make_random_adapters(library, tiny_base, ["pirate"], system_prompt="You are a pirate.")
    dialog = ExportDialog(library, "pirate")
    qtbot.addWidget(dialog)
    dialog.show()
    return dialog


def export_and_wait(qtbot, dialog) -> None:
    dialog.export_button.click()
    qtbot.waitUntil(lambda: not dialog.running, timeout=EXPORT_TIMEOUT_MS)


def test_exports_a_bundle_with_progress_and_asks_before_replacing(qtbot, dialog, tmp_path, monkeypatch):
    dialog.format_combo.setCurrentIndex(dialog.format_combo.findData("bundle"))
    target = tmp_path / "shared" / "pirate.tailor"
    dialog.destination.setText(str(target))
    progress = []
    dialog.progress.valueChanged.connect(progress.append)

    with qtbot.waitSignal(dialog.exported, timeout=EXPORT_TIMEOUT_MS) as exported:
        dialog.export_button.click()
    qtbot.waitUntil(lambda: not dialog.running, timeout=EXPORT_TIMEOUT_MS)
    assert exported.args == [str(target)]
    assert "adapter_model.safetensors" in zipfile.ZipFile(target).namelist()
    assert progress and dialog.progress.value() == dialog.progress.maximum()
    assert "Exported to" in dialog.banner.plain_text and dialog.open_folder_button.isVisible()

    questions = []
    monkeypatch.setattr(QMessageBox, "question", lambda *args, **kwargs: questions.append(args) or QMessageBox.StandardButton.No)
    target.write_bytes(b"an older export")
    export_and_wait(qtbot, dialog)
    assert len(questions) == 1 and target.read_bytes() == b"an older export"

    monkeypatch.setattr(QMessageBox, "question", lambda *args, **kwargs: QMessageBox.StandardButton.Yes)
    export_and_wait(qtbot, dialog)
    assert zipfile.is_zipfile(target)


def test_a_failed_export_shows_why(qtbot, dialog, tmp_path, monkeypatch):
    dialog.format_combo.setCurrentIndex(dialog.format_combo.findData("peft"))
    unrelated = tmp_path / "documents"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    dialog.destination.setText(str(unrelated))
    monkeypatch.setattr(QMessageBox, "question", lambda *args, **kwargs: QMessageBox.StandardButton.Yes)

    export_and_wait(qtbot, dialog)
    assert "will not replace it" in dialog.banner.plain_text
    assert (unrelated / "notes.txt").read_text() == "mine"
    assert dialog.export_button.isEnabled() and not dialog.progress.isVisible()
