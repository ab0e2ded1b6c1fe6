"""The dataset editor: a lazy model over the examples, edits with undo, filters from a background check, atomic
Save as…, and the Dataset page making, editing and saving a dataset converted from a real-format WhatsApp export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.core.data import load_dataset_file
from app.gui.dataset_editor import ASSISTANT, CHECK, FETCH_BATCH, TOKENS, USER, DatasetEditor
from app.gui.style import TRAINED_BACKGROUND

EXPORTS = Path(__file__).resolve().parents[1] / "fixtures" / "exports"
LOAD_TIMEOUT_MS = 60_000
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshots" / "dataset-editor.png"


def chat(user: str, reply: str | None) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}] + ([{"role": "assistant", "content": reply}] if reply else [])


@pytest.fixture
def editor(qtbot):
    widget = DatasetEditor()  # not qtbot.addWidget: it would delete the editor before its last check has ended
    widget.resize(900, 600)
    widget.show()
    yield widget
    qtbot.waitUntil(lambda: not widget.is_busy, timeout=LOAD_TIMEOUT_MS)
    widget.close()
    widget.deleteLater()


def word_count(messages) -> int:
    """Stands in for a tokenizer where the test is about the editor, not about tokens."""
    return sum(len(message["content"].split()) for message in messages)


def load(editor, rows, max_len=512):
    editor.set_examples(rows, [word_count(r) for r in rows], max_len, None, None)
    editor.model.recount = word_count


def test_rows_are_fetched_in_batches_as_the_view_scrolls(qtbot, editor):
    load(editor, [chat(f"question {i}", f"answer {i}") for i in range(2_000)])
    model = editor.model
    assert model.rowCount() == FETCH_BATCH and model.canFetchMore()
    editor.table.scrollToBottom()
    qtbot.waitUntil(lambda: model.rowCount() > FETCH_BATCH)
    while model.canFetchMore():
        model.fetchMore()
    assert model.rowCount() == 2_000 and model.index(1_999, USER).data() == "question 1999"
    assert editor.count.text() == "2,000 examples"


def test_edit_a_turn_then_undo_and_redo(qtbot, editor):
    load(editor, [chat("Hello", "Ahoy there"), chat("Bye", "Fair winds")])
    model = editor.model
    assert not editor.dirty
    assert model.setData(model.index(0, ASSISTANT), "Ahoy there, matey, welcome aboard")
    assert model.rows[0].messages[1]["content"] == "Ahoy there, matey, welcome aboard"
    assert model.index(0, TOKENS).data() == "6", "the edited row is recounted at once"
    assert editor.dirty and editor.undo_button.isEnabled()
    # The turns pane edits the same example through the same undo stack.
    editor.table.selectRow(0)
    turns = editor.turns
    assert turns.rowCount() == 2 and turns.index(1, 1).data() == "Ahoy there, matey, welcome aboard"
    assert turns.setData(turns.index(0, 1), "Hello, captain")
    assert model.index(0, USER).data() == "Hello, captain"

    editor.undo_button.click()
    editor.undo_button.click()
    assert model.rows[0].messages == chat("Hello", "Ahoy there") and model.index(0, TOKENS).data() == "3"
    editor.redo_button.click()  # redo goes forward in order: the reply first
    assert model.rows[0].messages == chat("Hello", "Ahoy there, matey, welcome aboard")


def test_delete_and_add_examples_with_undo(qtbot, editor):
    load(editor, [chat(f"q{i}", f"a{i}") for i in range(5)])
    model = editor.model
    editor.table.selectRow(1)
    editor.delete_selected()
    assert [row.messages[0]["content"] for row in model.rows] == ["q0", "q2", "q3", "q4"]
    editor.table.selectRow(2)
    editor.add_example()
    assert len(model.rows) == 5 and model.rows[3].messages == [{"role": "user", "content": ""},
                                                             {"role": "assistant", "content": ""}]
    assert editor.table.currentIndex().row() == 3, "the new example is selected, ready to type into"
    model.undo_stack.undo()
    model.undo_stack.undo()
    assert [row.messages[0]["content"] for row in model.rows] == ["q0", "q1", "q2", "q3", "q4"]
    assert model.index(1, 0).data() == "2"


def test_background_check_flags_rows_and_the_filters_show_them(qtbot, editor):
    rows = [chat("Hi there, how are you today?", "Fine, thanks!"), chat("No answer here", None),
            chat("hi there how are you today", "fine thanks"), chat("long " * 40, "reply " * 40)]
    load(editor, rows, max_len=50)
    with qtbot.waitSignal(editor.analysis_ready, timeout=LOAD_TIMEOUT_MS) as ready:
        pass
    report = ready.args[0]
    assert report.no_reply == [1] and report.too_long == [3] and report.duplicates == [2]
    assert editor.model.index(2, CHECK).data() == "duplicate of #1"
    assert editor.model.index(1, CHECK).data() == "no assistant reply"

    editor.filter.setCurrentIndex(editor.filter.findData("duplicates"))
    assert editor.model.rowCount() == 1 and editor.count.text() == "1 of 4 examples"
    editor.table.selectRow(0)
    editor.delete_selected()
    editor.filter.setCurrentIndex(editor.filter.findData("all"))
    assert editor.model.rowCount() == 3
    editor.model.undo_stack.undo()
    assert editor.dedupe_button.isEnabled()
    editor.dedupe_button.click()
    assert [row.messages[0]["content"] for row in editor.model.rows] == [rows[0][0]["content"], "No answer here", "long " * 40]
    # Editing re-runs the check: the duplicate is gone, the row without a reply gets one.
    with qtbot.waitSignal(editor.analysis_ready, timeout=LOAD_TIMEOUT_MS) as again:
        editor.model.setData(editor.model.index(1, ASSISTANT), "Here is one")
    assert again.args[0].duplicates == [] and again.args[0].no_reply == []


def test_save_as_writes_the_edited_rows_atomically(qtbot, editor, tmp_path):
    load(editor, [chat("Hello", "Ahoy"), chat("Bye", "Farewell")])
    editor.model.setData(editor.model.index(1, ASSISTANT), "Fair winds, matey")
    target = tmp_path / "edited.jsonl"
    target.write_text("old contents\n")
    with qtbot.waitSignal(editor.saved, timeout=LOAD_TIMEOUT_MS) as saved:
        editor.save_to(str(target))
    assert saved.args == [str(target)] and not editor.dirty
    assert load_dataset_file(target).conversations == [chat("Hello", "Ahoy"), chat("Bye", "Fair winds, matey")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.jsonl"]

    with qtbot.waitSignal(editor.failed, timeout=LOAD_TIMEOUT_MS) as failed:
        editor.save_to(str(tmp_path / "missing-folder" / "x.jsonl"))
    assert "does not exist" in failed.args[0].message
    qtbot.waitUntil(lambda: not editor.is_busy)


def choose_tiny_model(qtbot, wizard, tiny_base):
    page = wizard.model_page
    page.folder_field.edit.setText(str(tiny_base))
    page.folder_field.edit.editingFinished.emit()
    assert page.folder.isChecked()
    wizard.next()
    qtbot.waitUntil(lambda: wizard.current_index == 1, timeout=LOAD_TIMEOUT_MS)
    qtbot.waitUntil(lambda: not wizard.data_page.is_busy, timeout=LOAD_TIMEOUT_MS)


def test_dataset_page_converts_a_whatsapp_chat_edits_it_and_saves_it(qtbot, open_window, tiny_base, tmp_path):
    window = open_window()
    window.resize(1280, 800)
    wizard = window.wizard
    choose_tiny_model(qtbot, wizard, tiny_base)
    page = wizard.data_page

    page.convert(str(EXPORTS / "whatsapp_android_us.txt"), "whatsapp", "Sam", 6.0, True)
    qtbot.waitUntil(lambda: not page.is_busy and bool(page.editor.model.rows), timeout=LOAD_TIMEOUT_MS)
    qtbot.waitUntil(lambda: page.editor.report is not None and not page.editor.is_busy, timeout=LOAD_TIMEOUT_MS)
    model = page.editor.model
    assert len(model.rows) == 2 and page.editor.dirty
    assert "Converted whatsapp_android_us.txt" in page.banner.plain_text and "Person 1" in page.banner.plain_text
    assert "Maya" not in json.dumps(model.conversations()), "anonymised by default, and the preview shows it"
    assert "Not saved" in page.summary.text() and "the sample personas needed 60" in page.checks.text()
    assert page.validate() and "Save as" in page.validate(), "unsaved edits cannot go to training"

    # Edit the selected example's reply: the masking preview and the histogram follow.
    page.editor.table.selectRow(0)
    before = sum(page.histogram.lengths)
    with qtbot.waitSignal(page.editor.analysis_ready, timeout=LOAD_TIMEOUT_MS):
        model.setData(model.index(0, ASSISTANT), "Absolutely, wouldn't miss it for the world, and I will bring "
                                                 "the spare chalk bag, the guidebook and snacks for everyone.")
    trained = "".join(text for text, is_trained in page.example.segments if is_trained)
    assert "guidebook and snacks" in trained and TRAINED_BACKGROUND in page.example.toHtml()
    assert sum(page.histogram.lengths) > before

    page.editor.table.selectRow(0)
    # TAILOR_SCREENSHOTS=1 refreshes the README's picture; otherwise the shot only has to be taken.
    shot = SCREENSHOT if os.environ.get("TAILOR_SCREENSHOTS") else tmp_path / "dataset-editor.png"
    qtbot.wait(100)
    assert window.grab().save(str(shot)) and shot.stat().st_size > 10_000

    saved = tmp_path / "sam.jsonl"
    with qtbot.waitSignal(page.editor.saved, timeout=LOAD_TIMEOUT_MS):
        page.editor.save_to(str(saved))
    qtbot.waitUntil(lambda: wizard.context.dataset is not None and not page.is_busy, timeout=LOAD_TIMEOUT_MS)
    assert page.path_field.text() == str(saved) and page.validate() is None
    assert wizard.context.dataset.report.rows == 2 and not page.editor.dirty
    assert "guidebook" in saved.read_text(encoding="utf-8")


def test_bad_export_shows_the_file_and_line_on_the_page(qtbot, open_window, tiny_base):
    window = open_window()
    wizard = window.wizard
    choose_tiny_model(qtbot, wizard, tiny_base)
    page = wizard.data_page
    page.convert(str(EXPORTS / "whatsapp_korean.txt"), "whatsapp", "민준", 6.0, True)
    qtbot.waitUntil(lambda: not page.is_busy and page.banner.isVisible(), timeout=LOAD_TIMEOUT_MS)
    assert "whatsapp_korean.txt line 1" in page.banner.plain_text
    page.convert(str(EXPORTS / "whatsapp_android_us.txt"), "whatsapp", "Bob", 6.0, True)
    qtbot.waitUntil(lambda: not page.is_busy and "never speaks" in page.banner.plain_text, timeout=LOAD_TIMEOUT_MS)
    assert "Maya Lopez (9)" in page.banner.plain_text


# Corrected chats: "Edit reply" in the chat pane, then "Add to dataset…".

def test_chat_pane_edit_reply_then_add_to_dataset_appends_the_corrected_conversation(qtbot, library, tmp_path):
    from app.core.chat import BASE
    from app.gui.chat_pane import DONE, FAILED, ChatPane, Turn

    pane = ChatPane(library)
    qtbot.addWidget(pane)
    pane.show()
    persona = pane.personas[BASE]
    persona.system_prompt = "You are a pirate."
    persona.turns = [Turn("user", "Hello"), Turn("assistant", "Hello. How can I help?", DONE),
                     Turn("user", "Where is the treasure?"), Turn("assistant", "boom", FAILED)]
    pane._show_current()
    page = pane.transcript.toHtml()
    assert page.count("edit:") == 1 and "edit:1" in page, "only finished replies can be corrected"
    assert pane.add_to_dataset_button.isEnabled()

    pane.edit_reply(1, "Ahoy, matey! What be yer business aboard?")
    assert persona.turns[1].edited and "(edited)" in pane.transcript.toPlainText()
    dataset = tmp_path / "corrected.jsonl"
    dataset.write_text(json.dumps({"messages": chat("Earlier", "Arr")}) + "\n", encoding="utf-8")
    pane.add_to_dataset(str(dataset))
    assert "2 example(s) there now" in pane.banner.plain_text
    rows = load_dataset_file(dataset).conversations
    assert rows[1] == [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"},
                       {"role": "assistant", "content": "Ahoy, matey! What be yer business aboard?"},
                       {"role": "user", "content": "Where is the treasure?"}], "the failed reply is not kept"

    not_chat = tmp_path / "table.jsonl"
    not_chat.write_text('{"prompt": "a", "response": "b"}\n')
    pane.add_to_dataset(str(not_chat))
    assert "has no 'messages'" in pane.banner.plain_text
    assert not_chat.read_text() == '{"prompt": "a", "response": "b"}\n'


def test_convert_dialog_guesses_the_kind_and_offers_who_speaks(qtbot):
    from app.gui.dataset_editor import ConvertDialog

    dialog = ConvertDialog()
    qtbot.addWidget(dialog)
    dialog.show()
    dialog.choose(str(EXPORTS / "telegram_result.json"))
    assert dialog.source.currentData() == "telegram"
    qtbot.waitUntil(lambda: dialog.persona.count() == 2, timeout=LOAD_TIMEOUT_MS)
    assert [dialog.persona.itemText(i) for i in range(2)] == ["Ivan", "Nadia Petrova"], "most active first"
    assert "2 people speak" in dialog.status.text()
    dialog.buttons.accepted.emit()
    assert dialog.isVisible() and "Choose the export file and the persona" in dialog.status.text()
    dialog.persona.setCurrentText("Nadia Petrova")
    assert dialog.request() == {"path": str(EXPORTS / "telegram_result.json"), "source": "telegram",
                                "persona": "Nadia Petrova", "gap_hours": 6.0, "anonymise": True}
    dialog.choose(str(EXPORTS / "telegram_truncated.json"))
    qtbot.waitUntil(lambda: "cut off" in dialog.status.text(), timeout=LOAD_TIMEOUT_MS)
    qtbot.waitUntil(lambda: dialog._job is None, timeout=LOAD_TIMEOUT_MS)


# Unsaved edits and another file or format: Save / Discard / Cancel, as a text editor asks.

def test_unsaved_edits_are_kept_saved_or_dropped_as_the_user_answers_before_another_file_or_format(
        qtbot, open_window, tiny_base, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    window = open_window()
    window.resize(1280, 800)
    wizard = window.wizard
    choose_tiny_model(qtbot, wizard, tiny_base)
    page, editor, model = wizard.data_page, wizard.data_page.editor, wizard.data_page.editor.model
    qtbot.waitUntil(lambda: wizard.context.dataset is not None and not editor.is_busy, timeout=LOAD_TIMEOUT_MS)
    sample, loaded = page.path_field.text(), wizard.context.dataset
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"messages": chat(f"Question {i}", f"Answer {i}")}) + "\n" for i in range(3)))
    fixed = "Arr, a reply I fixed by hand."
    model.setData(model.index(0, ASSISTANT), fixed)
    assert editor.dirty

    asked: list[str] = []

    def answer(button, save_to: str = ""):
        def exec_(box):
            if not asked:  # the real dialog, as the user sees it
                box.show()
                box.grab().save(str(tmp_path / "unsaved-edits.png"))
                box.hide()
            asked.append(box.informativeText())
            return button
        monkeypatch.setattr(QMessageBox, "exec", exec_)
        monkeypatch.setattr("app.gui.dataset_editor.QFileDialog.getSaveFileName", lambda *a, **k: (save_to, ""))

    def still_editing() -> None:
        assert model.rows[0].messages[1]["content"] == fixed and editor.dirty and not page.is_busy
        assert wizard.context.dataset is loaded, "nothing was read"
        assert page.path_field.text() == sample and page.format() == "auto", "the previous choice is back"

    answer(QMessageBox.StandardButton.Cancel)
    page.format_combo.setCurrentIndex(page.format_combo.findData("alpaca"))
    assert asked == [f"The {len(model.rows):,} examples here have changes that are not in any file yet. Reading the "
                     "file as Alpaca (instruction / output) would replace them."]
    still_editing()
    page.set_path(str(other))
    assert "Opening other.jsonl would replace them." in asked[-1]
    still_editing()
    page.convert(str(EXPORTS / "whatsapp_android_us.txt"), "whatsapp", "Sam", 6.0, True)
    assert "Converting whatsapp_android_us.txt would replace them." in asked[-1]
    still_editing()
    answer(QMessageBox.StandardButton.Save, save_to="")  # Save, then no file chosen: as Cancel
    page.set_path(str(other))
    assert len(asked) == 4
    still_editing()

    saved = tmp_path / "fixed.jsonl"
    answer(QMessageBox.StandardButton.Save, save_to=str(saved))
    page.set_path(str(other))
    qtbot.waitUntil(lambda: wizard.context.dataset is not None and wizard.context.dataset.path == str(other)
                    and not page.is_busy, timeout=LOAD_TIMEOUT_MS)
    assert fixed in saved.read_text(encoding="utf-8") and len(load_dataset_file(saved).conversations) == len(loaded.loaded.conversations)
    assert page.path_field.text() == str(other) and [row.messages for row in model.rows] == \
        [chat(f"Question {i}", f"Answer {i}") for i in range(3)], "saved first, then the file the user chose"
    assert not editor.dirty and f"Saved {len(loaded.loaded.conversations):,} examples to {saved}" in page.banner.plain_text

    model.setData(model.index(0, ASSISTANT), "A change to throw away.")
    answer(QMessageBox.StandardButton.Discard)
    page.format_combo.setCurrentIndex(page.format_combo.findData("openai"))
    qtbot.waitUntil(lambda: wizard.context.dataset is not None and wizard.context.dataset.format == "openai"
                    and not page.is_busy, timeout=LOAD_TIMEOUT_MS)
    assert model.rows[0].messages == chat("Question 0", "Answer 0") and not editor.dirty
    assert other.read_text().count("Answer") == 3, "discarding never touches a file"
    asked_before = len(asked)
    page.set_path(sample)  # nothing unsaved now: no question
    qtbot.waitUntil(lambda: wizard.context.dataset is not None and wizard.context.dataset.path == sample
                    and not page.is_busy, timeout=LOAD_TIMEOUT_MS)
    assert len(asked) == asked_before
