"""The library panel: manifests in a sortable, filterable table, fit against the chat's base, damaged folders shown
with the reason, rename/delete/trash/add through the (stubbed) dialogs, details with the loss curve, and the
folder watcher picking up adapters written by someone else."""

from __future__ import annotations

import json
import shutil

import pytest
from adapter_factory import make_random_adapters
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QInputDialog, QMessageBox

from app.core.library import TRAINING_LOG_NAME, BaseProfile
from app.gui.library_panel import COLUMNS, NAME, LibraryPanel

STATUS = COLUMNS.index("Status")


@pytest.fixture
def adapters(library, tiny_base):
    entries = make_random_adapters(library, tiny_base, ["pirate", "poet"], system_prompt="Speak like a pirate.")
    (entries[0].path / TRAINING_LOG_NAME).write_text(json.dumps(
        [{"step": s, "loss": 3.0 / s, "lr": 1e-3, **({"eval_loss": 4.0 / s} if s % 5 == 0 else {})} for s in range(1, 21)]))
    make_random_adapters(library, tiny_base, ["wide"], rank=8)
    return library


@pytest.fixture
def panel(qtbot, adapters):
    panel = LibraryPanel(adapters)
    qtbot.addWidget(panel)
    panel.resize(1200, 600)
    panel.show()
    return panel


def names(panel: LibraryPanel) -> list[str]:
    return [panel.proxy.data(panel.proxy.index(row, NAME)) for row in range(panel.proxy.rowCount())]


def cell(panel: LibraryPanel, name: str, column: int) -> str:
    row = names(panel).index(name)
    return panel.proxy.data(panel.proxy.index(row, column))


def test_lists_sorts_and_filters_adapters_with_their_manifest(panel):
    assert names(panel) == ["pirate", "poet", "wide"]
    assert cell(panel, "wide", COLUMNS.index("Rank")) == "8" and cell(panel, "pirate", COLUMNS.index("Kind")) == "random"
    panel.table.sortByColumn(COLUMNS.index("Rank"), Qt.SortOrder.DescendingOrder)
    assert names(panel)[0] == "wide"
    panel.filter_edit.setText("PO")
    assert names(panel) == ["poet"]
    panel.filter_edit.clear()

    panel.select("pirate")
    details = panel.details
    assert details.title.text() == "pirate" and details.prompt.toPlainText() == "Speak like a pirate."
    assert details.loss_chart.steps == list(range(1, 21)) and details.loss_chart.isVisible()
    assert details.loss_chart.eval_steps == [5, 10, 15, 20] and details.loss_chart.eval_losses[0] == pytest.approx(0.8)
    settings = [details.parameters.topLevelItem(i).text(0) for i in range(details.parameters.topLevelItemCount())]
    assert "adapter_config" in settings and "base_model" in settings
    panel.select("poet")
    assert not details.loss_chart.isVisible() and details.no_curve.isVisible()


def test_fit_against_the_loaded_base_and_damaged_folders_with_the_reason(panel, library, tiny_base, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    assert "Open a persona in Chat" in panel.model.item(0, 0).toolTip(), "no base loaded yet: fit unknown"
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)).save_pretrained(other)
    make_random_adapters(library, other, ["stranger"])
    (library.adapters_dir / "half-written").mkdir()
    panel.set_base(BaseProfile.from_folder(tiny_base, "tiny"))

    assert cell(panel, "pirate", STATUS) == "ok"
    assert "trained for other" in cell(panel, "stranger", STATUS)
    assert "damaged: adapter_config.json is missing" in cell(panel, "half-written", STATUS)
    panel.select("half-written")
    assert not panel.chat_button.isEnabled() and panel.delete_button.isEnabled()
    panel.select("stranger")
    assert "Does not fit tiny" in panel.details.fit.text()


def test_open_in_chat_rename_delete_and_empty_trash(qtbot, panel, library, monkeypatch):
    panel.select("pirate")
    with qtbot.waitSignal(panel.open_in_chat) as opened:
        qtbot.mouseClick(panel.chat_button, Qt.MouseButton.LeftButton)
    assert opened.args == ["pirate"]

    monkeypatch.setattr(QInputDialog, "getText", lambda *args, **kwargs: ("captain", True))
    qtbot.mouseClick(panel.rename_button, Qt.MouseButton.LeftButton)
    assert names(panel) == ["captain", "poet", "wide"] and panel.selected_name() == "captain"

    monkeypatch.setattr(QInputDialog, "getText", lambda *args, **kwargs: ("poet", True))
    qtbot.mouseClick(panel.rename_button, Qt.MouseButton.LeftButton)
    assert "already exists" in panel.banner.plain_text and library.exists("captain")

    monkeypatch.setattr(QMessageBox, "question", lambda *args, **kwargs: QMessageBox.StandardButton.No)
    qtbot.mouseClick(panel.delete_button, Qt.MouseButton.LeftButton)
    assert library.exists("captain"), "nothing is deleted without confirmation"
    monkeypatch.setattr(QMessageBox, "question", lambda *args, **kwargs: QMessageBox.StandardButton.Yes)
    qtbot.mouseClick(panel.delete_button, Qt.MouseButton.LeftButton)
    assert names(panel) == ["poet", "wide"] and len(library.trash_entries()) == 1
    assert panel.trash_button.text() == "Empty trash (1)"
    qtbot.mouseClick(panel.trash_button, Qt.MouseButton.LeftButton)
    assert library.trash_entries() == [] and not panel.trash_button.isEnabled()


def test_a_peft_folder_from_elsewhere_is_added_and_a_pickle_is_refused(qtbot, panel, library, tmp_path, monkeypatch):
    foreign = tmp_path / "my_lora"
    shutil.copytree(library.get("poet").path, foreign)
    (foreign / "tailor.json").unlink()
    monkeypatch.setattr("app.gui.library_panel.QFileDialog.getExistingDirectory", lambda *args, **kwargs: str(foreign))
    monkeypatch.setattr(QInputDialog, "getText", lambda parent, title, label, text="": (text, True))
    qtbot.mouseClick(panel.add_button, Qt.MouseButton.LeftButton)
    assert "my_lora" in names(panel) and cell(panel, "my_lora", COLUMNS.index("Kind")) == "imported"

    (foreign / "adapter_model.safetensors").rename(foreign / "adapter_model.bin")
    monkeypatch.setattr(QInputDialog, "getText", lambda *args, **kwargs: ("pickled", True))
    qtbot.mouseClick(panel.add_button, Qt.MouseButton.LeftButton)
    assert "pickled weights" in panel.banner.plain_text and "pickled" not in names(panel)


def test_the_folder_is_watched_for_adapters_written_elsewhere(qtbot, panel, library, tiny_base):
    make_random_adapters(library, tiny_base, ["arrived"])
    qtbot.waitUntil(lambda: "arrived" in names(panel), timeout=5000)
    shutil.rmtree(library.adapters_dir / "poet")
    qtbot.waitUntil(lambda: "poet" not in names(panel), timeout=5000)
    # Another program copying an adapter in file by file: damaged while half-written, fine once complete.
    copying = library.adapters_dir / "copying"
    copying.mkdir()
    shutil.copy(library.adapters_dir / "wide" / "adapter_config.json", copying)
    qtbot.waitUntil(lambda: "copying" in names(panel), timeout=5000)
    assert cell(panel, "copying", STATUS).startswith("damaged: adapter_model.safetensors is missing")
    shutil.copy(library.adapters_dir / "wide" / "adapter_model.safetensors", copying)
    qtbot.waitUntil(lambda: cell(panel, "copying", STATUS) == "ok", timeout=5000)


def test_a_shared_bundle_is_imported_on_a_job_thread(qtbot, panel, library, tmp_path, monkeypatch):
    from app.core.export import export_adapter

    bundle = export_adapter(library, "poet", "bundle", tmp_path / "poet.tailor")
    monkeypatch.setattr("app.gui.library_panel.QFileDialog.getOpenFileName", lambda *args, **kwargs: (str(bundle), ""))
    qtbot.mouseClick(panel.import_button, Qt.MouseButton.LeftButton)
    assert not panel.import_button.isEnabled()
    qtbot.waitUntil(lambda: panel.import_job is None, timeout=60_000)
    assert "Imported 'poet-2'" in panel.banner.plain_text and panel.selected_name() == "poet-2"
    assert library.get("poet-2").ok
