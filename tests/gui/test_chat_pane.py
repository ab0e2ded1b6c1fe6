"""The chat pane with a real tiny model on its worker thread: personas with their own conversations, switching
mid-conversation, compare columns, stop, the pause during training, misfits and saving as JSONL; the sampling
controls following each persona's recommended settings, the precision note and the trimming note."""

from __future__ import annotations

import json

import pytest
from adapter_factory import make_random_adapters
from PySide6.QtCore import Qt

from app.core.chat import BASE, BASE_LABEL
from app.core.library import MANIFEST_NAME, Library, write_json_atomic
from app.gui.chat_pane import DONE, STOPPED, ChatPane
from app.gui.chat_worker import loaded_base

REPLY_TIMEOUT_MS = 120_000


@pytest.fixture
def personas(library, tiny_base) -> Library:
    make_random_adapters(library, tiny_base, ["alpha", "beta"], system_prompt="You are terse.")
    return library


@pytest.fixture
def pane(qtbot, personas, tiny_base):
    pane = ChatPane(personas)
    qtbot.addWidget(pane)
    # 'auto' would pick the personas' base too, but a first message to the bare base would load the bundled model.
    pane.base_combo.setCurrentText(str(tiny_base))
    pane.max_tokens.setValue(6)
    pane.resize(1100, 720)
    pane.show()
    yield pane
    pane.shutdown()


@pytest.fixture
def base_loads():
    loads = []
    loaded_base().changed.connect(loads.append)
    yield loads
    loaded_base().changed.disconnect(loads.append)


def send(qtbot, pane: ChatPane, choice: str, text: str) -> None:
    pane.select_persona(choice)
    pane.input.setPlainText(text)
    qtbot.mouseClick(pane.send_button, Qt.MouseButton.LeftButton)


def wait_for_replies(qtbot, pane: ChatPane) -> None:
    qtbot.waitUntil(lambda: not pane.pending, timeout=REPLY_TIMEOUT_MS)


def test_two_personas_keep_their_conversations_while_switching_mid_conversation(qtbot, pane, base_loads):
    pane.open_persona("alpha")
    pane.open_persona("beta")
    labels = [pane.persona_list.item(row).text() for row in range(pane.persona_list.count())]
    assert labels == [BASE_LABEL, "alpha", "beta"]
    assert pane.system_prompt.toPlainText() == "You are terse.", "the persona's own system prompt, editable"

    send(qtbot, pane, "alpha", "Hello alpha")
    # Switch while alpha is still answering: its reply keeps streaming into alpha's conversation.
    pane.select_persona("beta")
    assert "Hello alpha" not in pane.transcript.toPlainText()
    send(qtbot, pane, "beta", "Hello beta")
    wait_for_replies(qtbot, pane)

    alpha, beta = pane.personas["alpha"].turns, pane.personas["beta"].turns
    assert [turn.content for turn in alpha[::2]] == ["Hello alpha"] and alpha[1].state == DONE
    assert [turn.content for turn in beta[::2]] == ["Hello beta"] and beta[1].state == DONE
    pane.select_persona("alpha")
    shown = pane.transcript.toPlainText()
    assert "Hello alpha" in shown and "Hello beta" not in shown and alpha[1].content in shown

    send(qtbot, pane, "alpha", "And again")
    send(qtbot, pane, BASE, "Hello base")
    wait_for_replies(qtbot, pane)
    assert len(pane.personas["alpha"].turns) == 4 and len(pane.personas[BASE].turns) == 2
    assert len(base_loads) == 1, "one base serves every persona: switching never reloads it"


def test_compare_mode_answers_in_three_columns_with_the_same_settings(qtbot, pane):
    for slot, choice in enumerate([BASE, "alpha", "beta"]):
        combo = pane.compare_choices[slot]
        combo.setCurrentIndex(combo.findData(choice))
    pane.compare_prompt.setText("What is the sea?")
    qtbot.mouseClick(pane.compare_button, Qt.MouseButton.LeftButton)
    assert not pane.compare_button.isEnabled(), "a second comparison waits for the first"
    wait_for_replies(qtbot, pane)

    assert [column.choice for column in pane.compare_columns] == [BASE, "alpha", "beta"]
    titles = [pane.columns_layout.itemAt(index).widget().title() for index in range(pane.columns_layout.count())]
    assert titles == [BASE_LABEL, "alpha", "beta"]
    assert all(column.turn.state == DONE for column in pane.compare_columns)
    assert not any("▍" in column.column.toPlainText() for column in pane.compare_columns), "no column still streaming"
    assert "temperature 0.7" in pane.compare_note.text() and "seed" in pane.compare_note.text()
    assert {"alpha", "beta"} <= set(pane.personas), "compared personas are opened for chat too"


def test_stop_ends_a_reply_and_keeps_what_was_written(qtbot, pane):
    pane.max_tokens.setValue(400)
    send(qtbot, pane, BASE, "Write a long story.")
    reply = pane.personas[BASE].turns[-1]
    qtbot.waitUntil(lambda: bool(reply.content), timeout=REPLY_TIMEOUT_MS)
    qtbot.mouseClick(pane.stop_button, Qt.MouseButton.LeftButton)
    wait_for_replies(qtbot, pane)
    assert reply.state == STOPPED and "(stopped)" in pane.transcript.toPlainText()


def test_training_pauses_chat_and_it_resumes_afterwards(qtbot, pane, base_loads):
    send(qtbot, pane, BASE, "Hi")
    wait_for_replies(qtbot, pane)
    pane.set_training_active(True)
    assert not pane.send_button.isEnabled() and not pane.compare_button.isEnabled()
    assert pane.pause_banner.isVisible() and "paused while training" in pane.pause_banner.plain_text
    pane.open_persona("alpha")  # remembered, loaded when training is over
    qtbot.waitUntil(lambda: "unloaded" in pane.status.text(), timeout=REPLY_TIMEOUT_MS)

    pane.set_training_active(False)
    assert pane.send_button.isEnabled() and not pane.pause_banner.isVisible()
    send(qtbot, pane, "alpha", "Back again")
    wait_for_replies(qtbot, pane)
    assert pane.personas["alpha"].turns[-1].state == DONE
    assert len(base_loads) == 2, "the model loads again after training, with the persona opened meanwhile"


def test_a_persona_that_does_not_fit_is_marked_with_the_reason(qtbot, pane, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)).save_pretrained(other)
    make_random_adapters(pane.library, other, ["stranger"])
    pane.open_persona("alpha")
    pane.open_persona("stranger")
    qtbot.waitUntil(lambda: pane.personas["stranger"].problem is not None, timeout=REPLY_TIMEOUT_MS)
    assert "trained for other" in pane.personas["stranger"].problem
    assert "cannot be used" in pane.banner.plain_text
    item = pane.persona_list.findItems("stranger", Qt.MatchFlag.MatchExactly)[0]
    assert "trained for other" in item.toolTip()
    send(qtbot, pane, "stranger", "Hello?")
    assert pane.personas["stranger"].turns == [] and "cannot be used" in pane.banner.plain_text
    send(qtbot, pane, "alpha", "Still fine?")
    wait_for_replies(qtbot, pane)
    assert pane.personas["alpha"].turns[-1].state == DONE


def test_a_conversation_saves_as_training_jsonl(qtbot, pane, tmp_path, monkeypatch):
    pane.max_tokens.setValue(24)  # the tiny random model may spend a few tokens on ones that print nothing
    pane.open_persona("alpha")
    send(qtbot, pane, "alpha", "Hello")
    wait_for_replies(qtbot, pane)
    target = tmp_path / "talk.jsonl"
    monkeypatch.setattr("app.gui.chat_pane.QFileDialog.getSaveFileName", lambda *args, **kwargs: (str(target), ""))
    qtbot.mouseClick(pane.save_button, Qt.MouseButton.LeftButton)
    record = json.loads(target.read_text())
    roles = [message["role"] for message in record["messages"]]
    assert roles == ["system", "user", "assistant"] and record["messages"][0]["content"] == "You are terse."
    assert "Saved the conversation" in pane.banner.plain_text


def test_sampling_controls_follow_each_personas_recommended_settings(qtbot, pane, tiny_base, tmp_path):
    entry = make_random_adapters(pane.library, tiny_base, ["sailor"], system_prompt="You are a sailor.")[0]
    write_json_atomic(entry.path / MANIFEST_NAME, {**entry.manifest, "sampling": {"temperature": 0.2, "top_k": 10}})
    assert pane.quant_combo.currentText() == "auto"
    assert (pane.temperature.value(), pane.top_p.value(), pane.top_k.value(), pane.repetition_penalty.value()) == \
        (0.7, 0.9, 40, 1.1), "the local-LLM apps' defaults"
    assert pane.sampling_note.text() == "Tailor's default settings." and not pane.reset_sampling.isEnabled()

    pane.open_persona("sailor")
    assert (pane.temperature.value(), pane.top_k.value(), pane.top_p.value()) == (0.2, 10, 0.9)
    assert "the settings 'sailor' recommends" in pane.sampling_note.text().lower()
    pane.temperature.setValue(0.5)
    assert "Changed" in pane.sampling_note.text() and pane.reset_sampling.isEnabled()
    settings = pane.settings()
    assert (settings.temperature, settings.top_k, settings.repetition_penalty) == (0.5, 10, 1.1)
    pane.resize(1100, 720)
    pane.grab().save(str(tmp_path / "sampling.png"))

    pane.select_persona(BASE)
    assert (pane.temperature.value(), pane.top_k.value()) == (0.7, 40), "each persona keeps its own settings"
    pane.select_persona("sailor")
    assert pane.temperature.value() == 0.5, "and the user's change to them"
    qtbot.mouseClick(pane.reset_sampling, Qt.MouseButton.LeftButton)
    assert pane.temperature.value() == 0.2 and "Changed" not in pane.sampling_note.text()


def test_the_precision_note_says_what_auto_chose(qtbot, pane):
    send(qtbot, pane, BASE, "Hi")
    wait_for_replies(qtbot, pane)
    assert pane.precision_note.text().startswith("full precision (fp32): chosen automatically, it fits comfortably")
    pane.quant_combo.setCurrentText("4bit")
    assert pane.precision_note.text() == "Chosen when the model loads."
    send(qtbot, pane, BASE, "Hi again")
    wait_for_replies(qtbot, pane)
    assert pane.precision_note.text().startswith("4-bit (NF4): as chosen")


def test_a_conversation_longer_than_the_context_shows_a_note_and_still_answers(qtbot, pane):
    from app.gui.chat_pane import Turn

    persona = pane.personas[BASE]
    for turn in range(60):  # about 1,500 tokens; the tiny model reads 1,024
        persona.turns += [Turn("user", f"Question {turn}: tell me more about the sea and the ships"),
                          Turn("assistant", f"Answer {turn}: waves, salt, wind and sails")]
    send(qtbot, pane, BASE, "Last question: what is a ship?")
    wait_for_replies(qtbot, pane)
    reply = persona.turns[-1]
    assert reply.state == DONE and "longer than the model can read at once (1024 tokens)" in reply.note
    assert "the system prompt is kept" in pane.transcript.toPlainText()


def test_save_as_the_personas_defaults_writes_the_manifest_and_a_reopened_persona_starts_from_it(
        qtbot, pane, personas, tiny_base, tmp_path):
    pane.open_persona("alpha")
    assert not pane.save_sampling.isEnabled(), "nothing changed yet, nothing to save"
    pane.temperature.setValue(0.35)
    pane.top_k.setValue(12)
    assert "Changed" in pane.sampling_note.text() and pane.save_sampling.isEnabled()
    pane.grab().save(str(tmp_path / "sampling-save.png"))
    qtbot.mouseClick(pane.save_sampling, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: pane._sampling_save is None, timeout=10_000)

    manifest = json.loads((personas.get("alpha").path / MANIFEST_NAME).read_text())
    assert manifest["sampling"] == {"temperature": 0.35, "top_p": 0.9, "top_k": 12, "repetition_penalty": 1.1}
    assert manifest["system_prompt"] == "You are terse.", "the rest of the manifest is kept"
    assert pane.sampling_note.text() == "The settings 'alpha' recommends."
    assert not pane.save_sampling.isEnabled() and not pane.reset_sampling.isEnabled()
    pane.temperature.setValue(1.0)
    qtbot.mouseClick(pane.reset_sampling, Qt.MouseButton.LeftButton)
    assert pane.temperature.value() == 0.35, "Reset now goes back to the saved settings"

    pane.select_persona(BASE)
    assert not pane.save_sampling.isEnabled(), "the bare base has no manifest to write"
    pane.temperature.setValue(0.2)
    assert not pane.save_sampling.isEnabled()

    reopened = ChatPane(personas)  # the persona opened afresh, as in the next session of the app
    qtbot.addWidget(reopened)
    reopened.base_combo.setCurrentText(str(tiny_base))
    try:
        reopened.open_persona("alpha")
        assert (reopened.temperature.value(), reopened.top_k.value()) == (0.35, 12)
        assert "Changed" not in reopened.sampling_note.text() and not reopened.reset_sampling.isEnabled()
        assert reopened.settings().temperature == 0.35
    finally:
        reopened.shutdown()


def test_a_failed_save_says_why_and_keeps_the_users_settings(qtbot, pane, personas):
    pane.open_persona("beta")
    pane.temperature.setValue(0.4)
    personas.delete("beta")  # another window or command removed it meanwhile
    qtbot.mouseClick(pane.save_sampling, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: pane._sampling_save is None, timeout=10_000)
    assert "No adapter named 'beta'" in pane.banner.plain_text
    assert pane.temperature.value() == 0.4 and "Changed" in pane.sampling_note.text()


def test_compare_columns_of_library_personas_open_their_report_card(qtbot, pane, tmp_path):
    from app.gui.report_card import _open_views, close_report_cards

    pane.tabs.setCurrentIndex(1)
    for slot, choice in enumerate([BASE, "alpha"]):
        combo = pane.compare_choices[slot]
        combo.setCurrentIndex(combo.findData(choice))
    pane.compare_prompt.setText("What is the sea?")
    qtbot.mouseClick(pane.compare_button, Qt.MouseButton.LeftButton)
    wait_for_replies(qtbot, pane)
    boxes = [pane.columns_layout.itemAt(index).widget() for index in range(pane.columns_layout.count())]
    buttons = [box.findChildren(type(pane.compare_button)) for box in boxes]
    assert buttons[0] == [], "the bare base has no card of its own"
    (card_button,) = buttons[1]
    assert card_button.text() == "Report card" and card_button.isVisible()
    pane.grab().save(str(tmp_path / "compare-card.png"))
    try:
        qtbot.mouseClick(card_button, Qt.MouseButton.LeftButton)
        view = _open_views[(str(pane.library.root), "alpha")]
        assert view.isVisible() and view.name == "alpha"
        assert view.empty_label.isVisible() and view.evaluate_button.text() == "Evaluate", \
            "no card saved yet: the window offers to evaluate rather than starting on its own"
    finally:
        close_report_cards()
