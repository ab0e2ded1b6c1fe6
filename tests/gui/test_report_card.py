"""The report card window and the library's summary column, driven with pytest-qt on a tiny persona."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
from app.core.evaluation import CARD_KEY, knowledge_questions, saved_report_card
from app.core.library import Library
from app.core.training import run_training
from app.gui.library_panel import COLUMNS, LibraryPanel
from app.gui.report_card import ReportCardView, open_report_card
from app.gui.style import STYLE_SHEET

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
EVALUATION_TIMEOUT_MS = 300_000


@pytest.fixture
def tiny_library(tiny_base, chat_jsonl, tmp_path) -> Library:
    library = Library(tmp_path / "lib")
    run_training(RunConfig(name="tiny", system_prompt="You are a pirate.", model=ModelSource(base=str(tiny_base), quant="4bit"),
                           data=DataSettings(path=str(chat_jsonl), max_len=128), lora=LoraSettings(rank=4, alpha=8),
                           training=TrainingSettings(max_steps=2, batch_size=4, learning_rate=5e-3)), library)
    return library


def test_evaluate_fills_the_card_in_a_worker_and_the_library_summarises_it(qtbot, tiny_library, tmp_path):
    view = ReportCardView(tiny_library, "tiny")
    qtbot.addWidget(view)
    view.show()
    assert view.empty_label.isVisible() and not view.sections.isVisible()
    assert view.evaluate_button.text() == "Evaluate"

    with qtbot.waitSignal(view.card_saved, timeout=EVALUATION_TIMEOUT_MS) as saved:
        view.evaluate_button.click()
        assert not view.evaluate_button.isEnabled()  # the work runs in a worker: the window is still responsive
        qtbot.waitUntil(lambda: "Evaluating" in view.banner.plain_text, timeout=5000)
    assert saved.args == ["tiny"]
    qtbot.waitUntil(lambda: view.job is None, timeout=10000)

    card = view.card
    assert card is not None and saved_report_card(tiny_library.get("tiny")) == card
    assert view.replies.rowCount() == len(card.replies) == 2
    assert view.knowledge.rowCount() == len(knowledge_questions())
    assert view.tiles["knowledge"].value.text() == f"{card.knowledge_score()} · {card.knowledge_score('base')}"
    assert view.tiles["loss"].value.text().count("ppl") == 2
    assert card.replies[0].persona[:20] in view.replies.item(0, 2).text()
    assert view.evaluate_button.text() == "Evaluate again" and view.evaluate_button.isEnabled()
    assert not view.banner.isVisible()

    panel = LibraryPanel(tiny_library)
    qtbot.addWidget(panel)
    row = next(row for row in range(panel.proxy.rowCount()) if panel.proxy.data(panel.proxy.index(row, 1)) == "tiny")
    assert panel.proxy.data(panel.proxy.index(row, COLUMNS.index("Report card"))) == card.summary()


def test_library_button_opens_the_saved_card_without_recomputing_it(qtbot, tiny_library):
    from report_cards import sample_card

    tiny_library.update_manifest("tiny", {CARD_KEY: sample_card("tiny").to_dict()})
    panel = LibraryPanel(tiny_library)
    qtbot.addWidget(panel)
    panel.select("tiny")
    assert panel.card_button.isEnabled()
    panel.card_button.click()
    view = open_report_card(tiny_library, "tiny")  # the same window, raised again
    qtbot.addWidget(view)
    assert view.isVisible() and view.job is None and view.card == sample_card("tiny")
    assert view.tiles["style"].value.text() == "2/3 · 0/3"
    assert view.signature_label.text().endswith("matey, arr") and view.signature_label.isVisibleTo(view)
    assert "loops" in view.replies.item(1, 2).text()


def test_report_card_screenshot(qtbot, tiny_library):
    """The card as the docs show it, from the real pirate card measured on SmolLM2 when one is recorded, else a
    small sample; saved to docs/screenshots/report-card.png."""
    from report_cards import recorded_or_sample_card

    card = recorded_or_sample_card()
    tiny_library.rename("tiny", card.adapter)
    tiny_library.update_manifest(card.adapter, {CARD_KEY: card.to_dict()})
    view = ReportCardView(tiny_library, card.adapter)
    qtbot.addWidget(view)
    view.setStyleSheet(STYLE_SHEET)  # as the app looks (it sets the sheet on the whole application)
    view.resize(1280, 800)
    view.show()
    qtbot.waitExposed(view)
    qtbot.wait(200)  # the rows take their height once the columns have their final widths
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert view.grab().save(str(SCREENSHOTS / "report-card.png"))


def test_the_card_opens_and_evaluates_when_training_ends_and_closing_stops_it(qtbot, open_window, tiny_run):
    from app.gui.report_card import _open_views
    from app.gui.training_panel import FINISHED

    window = open_window()
    window.start_training(tiny_run("fresh", max_steps=2))
    qtbot.waitUntil(lambda: window.training_panel.state == FINISHED, timeout=EVALUATION_TIMEOUT_MS)
    view = _open_views[(str(window.library.root), "fresh")]
    assert view.isVisible() and view.is_evaluating
    qtbot.waitUntil(lambda: "Evaluating" in view.banner.plain_text, timeout=5000)
    job = view.job
    window.close()  # closing the app closes the card, which stops its evaluation within a token
    qtbot.waitUntil(lambda: not job.running, timeout=60_000)
    assert (str(window.library.root), "fresh") not in _open_views
    assert saved_report_card(window.library.get("fresh")) is None, "a stopped evaluation saves nothing"


def test_a_saved_mix_gets_the_same_card(qtbot, tiny_base, chat_jsonl, tiny_library):
    """The mixer's Report card button evaluates the mix it saved last: the held-out prompts and the style of its
    heaviest parent."""
    from app.core.chat import ChatSession
    from app.core.mixing import save_mix
    from app.gui.mixer import PersonaMixer

    run_training(RunConfig(name="other", system_prompt="You are a poet.", model=ModelSource(base=str(tiny_base), quant="4bit"),
                           data=DataSettings(path=str(chat_jsonl), max_len=128), lora=LoraSettings(rank=4, alpha=8),
                           training=TrainingSettings(max_steps=1, batch_size=4)), tiny_library)
    mixer = PersonaMixer(tiny_library)
    qtbot.addWidget(mixer)
    session = ChatSession(str(tiny_base), "4bit")

    def save(name, spec):  # what the chat pane's worker does with the request
        for parent in spec.names:
            session.load_adapter(tiny_library.get(parent))
        session.add_mix(name, spec)
        save_mix(session, tiny_library, name)
        mixer.refresh()

    mixer.save_requested.connect(save)
    mixer.set_parents({"tiny": 0.8, "other": 0.2})
    mixer.name_edit.setText("blend")
    assert not mixer.card_button.isEnabled()
    mixer.save_button.click()
    assert mixer.saved_mix == "blend" and mixer.card_button.isEnabled()

    mixer.card_button.click()
    view = open_report_card(tiny_library, "blend")
    qtbot.addWidget(view)
    with qtbot.waitSignal(view.card_saved, timeout=EVALUATION_TIMEOUT_MS):
        pass
    card = view.card
    assert card.adapter == "blend" and card.system_prompt == "You are a pirate."  # the heaviest parent's voice
    assert card.prompt_source.startswith("last 2 of 16 training examples") and card.style() is not None
