"""The report card window: a persona against its base, as app.core.evaluation measured it.

It shows the card saved in the adapter's manifest at once, and (re)computes it in a worker: the evaluation loads the
base and generates some forty replies, which takes a minute or more on a CPU and must not freeze the window.
"""

from __future__ import annotations

import html
import threading

from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView, QHBoxLayout, QHeaderView, QLabel, QPushButton, QTableWidget, QTableWidgetItem, QTabWidget,
    QVBoxLayout, QWidget,
)

from app.core.chat import ChatSession, base_for
from app.core.evaluation import (
    ReportCard, Tally, evaluate_adapter, plan_card, reply_marks, save_report_card, saved_report_card,
)
from app.core.library import Library
from app.gui.style import WARN
from app.gui.training_panel import StatTile
from app.gui.wizard.base import Banner
from app.gui.workers import Job, run_function

IN_STYLE_BACKGROUND = "#e7f5ea"
LOOP_BACKGROUND = "#fdecea"


def _tally(tally: Tally | None) -> str:
    return str(tally) if tally else "n/a"


def _loss(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.2f} (ppl {ReportCard.perplexity(loss):.1f})"


def evaluate_in_worker(library: Library, name: str, prompts_file: str | None = None, stop: threading.Event | None = None):
    """The work a card's worker does: open the persona on its base at chat's precision, evaluate, save."""

    def work(report):
        entry = library.get_usable(name)
        plan = plan_card(library, entry, prompts_file)
        base, quant = base_for([entry], None, None)
        session = ChatSession(base, quant, progress=report)
        card = evaluate_adapter(session, entry, plan, progress=report, stop=stop)
        save_report_card(library, name, card)
        return card

    return work


class ReportCardView(QWidget):
    """One persona's card: totals as tiles, then the replies side by side, then the knowledge answers."""

    card_saved = Signal(str)
    """A new card was written into this adapter's manifest (its name): the library's summary column changed."""

    def __init__(self, library: Library, name: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.library, self.name = library, name
        self.card: ReportCard | None = None
        self.job: Job | None = None
        self._stop = threading.Event()
        self.setWindowTitle(f"Report card — {name}")

        self.title = QLabel(f"Report card: {html.escape(name)}")
        self.title.setObjectName("pageTitle")
        self.subtitle = QLabel()
        self.subtitle.setObjectName("pageSubtitle")
        self.subtitle.setWordWrap(True)
        self.banner = Banner()
        self.evaluate_button = QPushButton("Evaluate")
        self.evaluate_button.setObjectName("primary")
        self.evaluate_button.setToolTip("Ask the base and the persona the held-out and knowledge questions again "
                                        "(same seed, so the same adapter gives the same card).")
        self.tiles = {key: StatTile(caption) for key, caption in (
            ("style", "Style (persona · base)"), ("loops", "Loops (persona · base)"),
            ("topic", "On topic (persona · base)"), ("knowledge", "Knowledge (persona · base)"),
            ("loss", "Held-out loss: base → persona"))}
        for key, tip in (("style", "Replies that read like the persona's training replies rather than like the base "
                                   "model: they use its signature words or its character patterns more than nine in "
                                   "ten of the base's own replies do."),
                         ("loops", "Replies that say one phrase three times in a row, or mostly repeat themselves."),
                         ("topic", "Replies that the base model finds likelier after their own question than after any "
                                   "other question on the card."),
                         ("knowledge", "Short general questions (resources/eval/knowledge.jsonl), answered greedily and "
                                       "scored by keywords: did the persona forget what the base knew?"),
                         ("loss", "Cross-entropy of the held-out reference replies (assistant tokens only); lower "
                                  "means the persona expects replies like its data.")):
            self.tiles[key].setToolTip(tip)

        self.replies = self._table(("Question", "Base", "Persona"))
        self.knowledge = self._table(("Question", "Base", "Persona"))
        self.sections = QTabWidget()
        self.sections.setDocumentMode(True)
        self.sections.addTab(self.replies, "Held-out replies")
        self.sections.addTab(self.knowledge, "Knowledge check")
        self.signature_label = QLabel()
        self.signature_label.setObjectName("muted")
        self.signature_label.setWordWrap(True)
        self.empty_label = QLabel("No report card yet. Evaluate to ask the base and this persona the held-out "
                                  "questions and the knowledge check.")
        self.empty_label.setObjectName("muted")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)

        header = QHBoxLayout()
        header.addWidget(self.title)
        header.addStretch(1)
        header.addWidget(self.evaluate_button)
        tiles = QHBoxLayout()
        for tile in self.tiles.values():
            tiles.addWidget(tile)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 10, 10, 10)
        layout.addLayout(header)
        layout.addWidget(self.subtitle)
        layout.addWidget(self.banner)
        layout.addLayout(tiles)
        layout.addWidget(self.signature_label)
        layout.addWidget(self.sections, 1)
        layout.addWidget(self.empty_label, 1)

        self.evaluate_button.clicked.connect(self.evaluate)
        self.resize(1100, 720)
        self.show_card(saved_report_card(library.get(name)))

    @staticmethod
    def _table(headers: tuple[str, ...]) -> QTableWidget:
        table = QTableWidget(0, len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        table.setWordWrap(True)
        table.verticalHeader().hide()
        header = table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        header.resizeSection(0, 220)
        for column in range(1, len(headers)):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.Stretch)
        # Row heights follow the wrapped text, which depends on the column widths the window ends up with.
        header.sectionResized.connect(lambda *_: table.resizeRowsToContents())
        return table

    # Showing

    def show_card(self, card: ReportCard | None) -> None:
        self.card = card
        self.sections.setVisible(card is not None)
        self.empty_label.setVisible(card is None)
        self.signature_label.setVisible(card is not None)
        self.evaluate_button.setText("Evaluate again" if card else "Evaluate")
        if card is None:
            self.subtitle.setText("")
            for tile in self.tiles.values():
                tile.set("—")
            return
        self.subtitle.setText(f"{card.summary()}  —  {len(card.replies)} prompts from {card.prompt_source}; "
                              f"{card.base_model} in {card.quant}; {card.settings}; {card.created[:16].replace('T', ' ')}")
        self.tiles["style"].set(f"{_tally(card.style())} · {_tally(card.style('base'))}")
        self.signature_label.setText(
            f"Signature words (common in the training replies, rare in the base's): {', '.join(card.signature_words)}"
            if card.signature_words else "No signature words: the style is judged by its character patterns alone.")
        self.tiles["loops"].set(f"{card.loops()} · {card.loops('base')}")
        self.tiles["topic"].set(f"{_tally(card.on_topic())} · {_tally(card.on_topic('base'))}")
        self.tiles["knowledge"].set(f"{card.knowledge_score()} · {card.knowledge_score('base')}")
        self.tiles["loss"].set(f"{_loss(card.base_loss)} → {_loss(card.persona_loss)}")
        self._fill(self.replies, [(pair.question,
                                   (pair.base, reply_marks(pair.base_style, pair.base_loops, pair.base_on_topic)),
                                   (pair.persona, reply_marks(pair.persona_style, pair.persona_loops, pair.persona_on_topic)))
                                  for pair in card.replies])
        self._fill(self.knowledge, [(f"{answer.question}\n(accepts: {', '.join(answer.accept)})",
                                     (answer.base, "right" if answer.base_correct else "wrong"),
                                     (answer.persona, "right" if answer.persona_correct else "wrong"))
                                    for answer in card.knowledge])

    def _fill(self, table: QTableWidget, rows: list[tuple[str, tuple[str, str], tuple[str, str]]]) -> None:
        table.setRowCount(len(rows))
        for row, (question, *replies) in enumerate(rows):
            table.setItem(row, 0, QTableWidgetItem(question))
            for column, (text, tags) in enumerate(replies, 1):
                item = QTableWidgetItem(f"[{tags}]  {text or '(empty reply)'}")
                item.setToolTip(tags)
                if "loops" in tags or tags == "wrong":
                    item.setBackground(QBrush(QColor(LOOP_BACKGROUND)))
                elif "in style" in tags or tags == "right":
                    item.setBackground(QBrush(QColor(IN_STYLE_BACKGROUND)))
                if "off topic" in tags:
                    item.setForeground(QBrush(QColor(WARN)))
                table.setItem(row, column, item)
            for column in range(table.columnCount()):
                table.item(row, column).setTextAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        table.resizeRowsToContents()

    # Evaluating

    @Slot()
    def evaluate(self, prompts_file: str | None = None) -> None:
        """Compute a fresh card in a worker; the window stays usable and shows what is being asked."""
        if self.job is not None:
            return
        self.evaluate_button.setEnabled(False)
        self.banner.show_message("Evaluating… the base and the persona answer every question; this takes a minute "
                                 "or more on a CPU.", tone="info")
        self._stop.clear()
        self.job = run_function(evaluate_in_worker(self.library, self.name, prompts_file, self._stop))
        self.job.event.connect(self._progress)
        self.job.succeeded.connect(self._evaluated)
        self.job.failed.connect(self._failed)
        self.job.finished.connect(self._job_finished)

    @property
    def is_evaluating(self) -> bool:
        return self.job is not None

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        # After the layout has given the tables their new widths (it runs after this event), fit the rows again.
        for table in (self.replies, self.knowledge):
            QTimer.singleShot(0, table, table.resizeRowsToContents)

    def closeEvent(self, event) -> None:
        # A closed card needs no answers: the worker stops within a token instead of generating on unseen.
        self._stop.set()
        super().closeEvent(event)

    @Slot(object)
    def _progress(self, message) -> None:
        self.banner.show_message(f"Evaluating… {message}", tone="info")

    @Slot(object)
    def _evaluated(self, card: ReportCard) -> None:
        self.banner.clear()
        self.show_card(card)
        self.card_saved.emit(self.name)

    @Slot(object)
    def _failed(self, failure) -> None:
        self.banner.show_message(failure.message, failure.hint)

    @Slot()
    def _job_finished(self) -> None:
        self.job = None
        self.evaluate_button.setEnabled(True)


_open_views: dict[tuple[str, str], ReportCardView] = {}
"""Report card windows that are open, by (library root, adapter name): asking again raises the same window."""


def open_report_card(library: Library, name: str, evaluate: bool = False) -> ReportCardView:
    """Show the adapter's report card in its own window (one per adapter); `evaluate` also computes a fresh one
    unless one is being computed already."""
    key = (str(library.root), name)
    view = _open_views.get(key)
    if view is None:
        view = ReportCardView(library, name)
        view.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        view.destroyed.connect(lambda *_: _open_views.pop(key, None))
        _open_views[key] = view
    view.show()
    view.raise_()
    view.activateWindow()
    if evaluate and not view.is_evaluating:
        view.evaluate()
    return view


def close_report_cards() -> None:
    """Close every open card window (the app is closing): their evaluations stop."""
    for view in list(_open_views.values()):
        view.close()
