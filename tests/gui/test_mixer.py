"""The persona mixer: live reasons why a mix cannot work, then a real preview in chat and a saved mix in the library
that records its parents."""

from __future__ import annotations

import pytest
from adapter_factory import make_random_adapters
from PySide6.QtCore import Qt

from app.gui.chat_pane import DONE, ChatPane
from app.gui.mixer import PersonaMixer

TIMEOUT_MS = 120_000


@pytest.fixture
def personas(library, tiny_base):
    make_random_adapters(library, tiny_base, ["pirate", "poet"], system_prompt="Arr.")
    make_random_adapters(library, tiny_base, ["wide"], rank=8, seed=3)
    return library


def test_the_mixer_explains_what_cannot_be_mixed(qtbot, personas):
    mixer = PersonaMixer(personas)
    qtbot.addWidget(mixer)
    assert not mixer.save_button.isEnabled() and "at least one adapter" in mixer.problem.text()

    mixer.set_parents({"pirate": 0.5, "wide": 0.5})
    assert "linear needs adapters of equal rank" in mixer.problem.text()
    assert not mixer.save_button.isEnabled() and not mixer.preview_button.isEnabled()
    assert not mixer.density.isEnabled()
    mixer.set_method("cat")
    assert mixer.save_button.isEnabled() and mixer.problem.text().startswith("Ready: cat: pirate x0.5 + wide x0.5")
    mixer.set_method("dare_ties")
    assert mixer.density.isEnabled() and "equal rank" in mixer.problem.text()

    mixer.set_method("linear")
    mixer.set_parents({"pirate": 0.7, "poet": 0.3})
    slider = mixer._rows["poet"][1]
    slider.setValue(45)
    assert mixer.spec().parents == (("pirate", 0.7), ("poet", 0.45)), "the slider sets the weight"
    mixer.name_edit.setText("poet")
    assert "already exists" in mixer.problem.text()
    mixer.name_edit.setText("pirate poet")
    with qtbot.waitSignal(mixer.save_requested) as requested:
        qtbot.mouseClick(mixer.save_button, Qt.MouseButton.LeftButton)
    assert requested.args[0] == "pirate poet" and requested.args[1].method == "linear"


def test_preview_a_mix_in_chat_then_save_it_into_the_library(qtbot, personas, tiny_base):
    pane = ChatPane(personas)
    qtbot.addWidget(pane)
    pane.base_combo.setCurrentText(str(tiny_base))
    pane.max_tokens.setValue(6)
    try:
        mixer = pane.mixer
        mixer.set_parents({"pirate": 0.7, "poet": 0.3})
        mixer.name_edit.setText("blend")
        qtbot.mouseClick(mixer.preview_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: pane.current_choice() == "blend", timeout=TIMEOUT_MS)
        assert pane.tabs.currentIndex() == 0 and pane.title.text() == "blend (mix preview)"
        assert pane.system_prompt.toPlainText() == "Arr.", "a mix speaks with its heaviest parent's system prompt"
        pane.input.setPlainText("Who are you?")
        qtbot.mouseClick(pane.send_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: not pane.pending, timeout=TIMEOUT_MS)
        assert pane.personas["blend"].turns[-1].state == DONE

        qtbot.mouseClick(mixer.save_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: personas.exists("blend"), timeout=TIMEOUT_MS)
        qtbot.waitUntil(lambda: "Saved the mix" in pane.banner.plain_text, timeout=TIMEOUT_MS)
        entry = personas.get("blend")
        assert entry.kind == "mix" and entry.manifest["method"] == "linear"
        assert entry.manifest["parents"] == [{"name": "pirate", "weight": 0.7}, {"name": "poet", "weight": 0.3}]
        assert pane.personas["blend"].label == "blend", "the preview became a library persona"
        assert "blend" in mixer.entries and mixer.name_edit.text() != "blend"
    finally:
        pane.shutdown()
