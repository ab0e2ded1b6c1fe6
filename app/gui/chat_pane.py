"""The chat pane: talk to personas on one loaded base, compare them side by side, and mix new ones.

Threading: all torch work happens in a ChatWorker on its own QThread (started on first use). The pane sends it
requests through queued signals and receives reply pieces the same way; Stop is a watermark the pane writes directly,
because a queued call would wait behind the very reply it should stop.

While training runs (`set_training_active(True)`), chat is paused: a running reply is stopped, the chat's model is
unloaded so training gets all the memory (on a GPU the two would otherwise compete for VRAM, on a CPU for the same
cores), and sending is disabled with a banner saying why. Conversations, opened personas and previewed mixes are
kept; the model and personas load again with the next message after training ends.
"""

from __future__ import annotations

import html
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QEvent, Qt, QThread, QUrl, Signal, Slot
from PySide6.QtWidgets import (
    QComboBox, QDoubleSpinBox, QFileDialog, QGridLayout, QGroupBox, QHBoxLayout, QInputDialog, QLabel, QLineEdit, QListWidget,
    QListWidgetItem, QPlainTextEdit, QPushButton, QSpinBox, QSplitter, QStyle, QTabWidget, QTextBrowser, QVBoxLayout,
    QWidget,
)

from app.core.chat import (
    BASE, BASE_LABEL, CHAT_PRECISIONS, ChatSession, GenerationSettings, recommend_sampling, save_conversation,
)
from app.core.errors import TailorError
from app.core.library import Library
from app.core.mixing import MixSpec
from app.gui.chat_worker import AUTO_BASE, ChatWorker, ReplyRequest, loaded_base
from app.gui.library_panel import LibraryWatcher
from app.gui.mixer import PersonaMixer
from app.gui.serve_panel import ServePanel
from app.gui.style import ACCENT, BAD, MUTED
from app.gui.wizard.base import Banner
from app.gui.workers import Job, run_function

CHOICE_ROLE = Qt.ItemDataRole.UserRole
PERSONA_COLOUR = "#7b3fa0"
COMPARE_SLOTS = 4
NO_CHOICE = ""
TRAINING_PAUSE = ("Chat is paused while training runs: both on one machine would slow training down and could run "
                  "out of memory. The chat model was unloaded; it loads again, with your personas, when training ends.")
STREAMING, DONE, STOPPED, FAILED = "streaming", "done", "stopped", "failed"


@dataclass
class Turn:
    role: str
    content: str
    state: str = DONE
    note: str = ""
    """Shown above a reply: which older messages the model could not read along with it."""
    edited: bool = False
    """The user corrected this reply ("Edit reply"), so it is what the persona should have said."""


@dataclass
class Pending:
    """A reply on its way: which choice writes it, the turn it fills, and the compare column showing it, if any."""

    choice: str
    turn: Turn
    column: QTextBrowser | None = None


def default_sampling() -> dict[str, float | int]:
    return GenerationSettings().sampling()


@dataclass
class Persona:
    label: str
    system_prompt: str
    turns: list[Turn] = field(default_factory=list)
    problem: str | None = None
    is_preview: bool = False
    recommended: dict[str, float | int] = field(default_factory=default_sampling)
    """The decoding its manifest recommends ("sampling"), or Tailor's defaults."""
    recommended_by_persona: bool = False
    """Whether `recommended` came from the persona's manifest rather than Tailor's defaults."""
    sampling: dict[str, float | int] = field(default_factory=default_sampling)
    """The decoding used for it now: the recommended one until the user changes a control."""


def history(turns: list[Turn]) -> list[dict[str, str]]:
    """The conversation as the model (and a training file) should see it: no failed or empty replies."""
    return [{"role": turn.role, "content": turn.content} for turn in turns
            if turn.role == "user" or (turn.state in (DONE, STOPPED) and turn.content.strip())]


def render_turns(turns: list[Turn], persona_label: str | None, editable: bool = False) -> str:
    """Turns as HTML; without a persona label (compare columns, titled already) replies show no speaker line.
    `editable` adds an "Edit reply" link (href edit:INDEX) under each finished reply."""
    blocks = []
    for index, turn in enumerate(turns):
        speaker, colour = ("You", ACCENT) if turn.role == "user" else (persona_label, PERSONA_COLOUR)
        body = html.escape(turn.content).replace("\n", "<br>")
        if turn.state == STREAMING:
            body += f"<span style='color:{MUTED}'> ▍</span>"
        elif turn.state == STOPPED:
            body += f" <span style='color:{MUTED}'>(stopped)</span>"
        elif turn.state == FAILED:
            body = f"<span style='color:{BAD}'>{body}</span>"
        if turn.note:
            body = f"<span style='color:{MUTED}'><i>({html.escape(turn.note)})</i></span><br>{body}"
        if turn.edited:
            body += f" <span style='color:{MUTED}'>(edited)</span>"
        if editable and turn.role == "assistant" and turn.state in (DONE, STOPPED):
            body += f"<br><a href='edit:{index}' style='color:{MUTED}; font-size:small'>Edit reply</a>"
        header = f"<b style='color:{colour}'>{html.escape(speaker)}</b><br>" if speaker else ""
        blocks.append(f"<p style='margin-bottom:10px'>{header}{body}</p>")
    return "".join(blocks)


class ChatPane(QWidget):
    # Requests to the worker; queued to its thread because the worker lives there.
    _configure_base = Signal(str, str)
    _open_persona = Signal(str)
    _generate = Signal(object)
    _preview_mix = Signal(str, object)
    _save_mix = Signal(str, object)
    _release = Signal()

    def __init__(self, library: Library, parent: QWidget | None = None):
        super().__init__(parent)
        self.library = library
        self.personas: dict[str, Persona] = {BASE: Persona(BASE_LABEL, "")}
        self.pending: dict[int, Pending] = {}
        self.training_active = False
        self._request_ids = itertools.count(1)
        self._last_request = 0
        self._thread: QThread | None = None
        self._worker: ChatWorker | None = None
        self._previewing: str | None = None
        self._configured_base: tuple[str, str] | None = None

        self.banner = Banner()
        self.pause_banner = Banner()
        self.tabs = QTabWidget()
        self.tabs.addTab(self._build_chat_tab(), "Chat")
        self.tabs.addTab(self._build_compare_tab(), "Compare")
        self.mixer = PersonaMixer(library)
        self.tabs.addTab(self.mixer, "Mixer")
        self.status = QLabel("No model loaded yet: open a persona or send a message.")
        self.status.setObjectName("muted")

        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 4)
        layout.addWidget(self.pause_banner)
        layout.addLayout(self._build_settings_row())
        layout.addWidget(self.banner)
        layout.addWidget(self.tabs, 1)
        self.serve_panel = ServePanel(library, self._chosen_base)
        layout.addWidget(self.serve_panel)
        layout.addWidget(self.status)

        self.mixer.preview_requested.connect(self._request_preview)
        self.mixer.save_requested.connect(self._request_save)
        self.watcher = LibraryWatcher(library, self)
        self.watcher.changed.connect(self._library_changed)
        self._refresh_persona_list(select=BASE)
        self._library_changed()

    # Building

    def _build_settings_row(self) -> QVBoxLayout:
        self.base_combo = QComboBox(editable=True)
        self.base_combo.addItems([AUTO_BASE, "default"])
        self.base_combo.setToolTip("'auto': the base the first opened persona was trained on (the bundled SmolLM2 if "
                                   "none); 'default': the bundled SmolLM2-135M-Instruct; or a model folder, .gguf "
                                   "file or hub id. Every persona runs on this one loaded base.")
        self.base_combo.setMinimumWidth(150)
        self.quant_combo = QComboBox()
        self.quant_combo.addItems(list(CHAT_PRECISIONS))
        self.quant_combo.setToolTip("How the base is held in memory. 'auto' keeps it unquantised (better replies) when "
                                    "it fits comfortably in free memory and uses 4-bit NF4 only when it must; "
                                    "adapters work on all of them.")
        self.precision_note = QLabel("Chosen when the model loads.")
        self.precision_note.setObjectName("muted")
        self.precision_note.setWordWrap(True)
        defaults = GenerationSettings()
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, value=defaults.temperature, decimals=2)
        self.temperature.setToolTip("0 is greedy: the same reply every time. Higher is more varied.")
        self.top_p = QDoubleSpinBox(minimum=0.05, maximum=1.0, singleStep=0.05, value=defaults.top_p, decimals=2)
        self.top_p.setToolTip("Sample only among the most likely tokens adding up to this probability.")
        self.top_k = QSpinBox(minimum=0, maximum=1000, value=defaults.top_k, specialValueText="off")
        self.top_k.setToolTip("Sample only among this many most likely tokens (off: no limit).")
        self.repetition_penalty = QDoubleSpinBox(minimum=1.0, maximum=3.0, singleStep=0.05,
                                                 value=defaults.repetition_penalty, decimals=2)
        self.repetition_penalty.setToolTip(f"Discourage tokens used in the last {defaults.repetition_window}, so "
                                           "replies do not loop; 1 is off.")
        self.max_tokens = QSpinBox(minimum=1, maximum=4096, value=defaults.max_new_tokens)
        self.max_tokens.setToolTip("Longest reply, in tokens.")
        self.seed = QSpinBox(minimum=-1, maximum=2**31 - 1, value=-1, specialValueText="random")
        self.seed.setToolTip("Fix the random draws so a sampled reply can be repeated; compare always uses one seed for all.")
        self.sampling_note = QLabel()
        self.sampling_note.setObjectName("muted")
        self.reset_sampling = QPushButton("Reset")
        self.reset_sampling.setToolTip("Back to the persona's recommended settings.")
        self.reset_sampling.clicked.connect(self._reset_sampling)
        self.save_sampling = QPushButton("Save as defaults")
        self.save_sampling.setToolTip("Save as this persona's defaults: written into its manifest, so chat starts "
                                      "from them next time, and serve, bundles and the Ollama export use them.")
        self.save_sampling.clicked.connect(self._save_sampling)
        self._sampling_save: Job | None = None

        model_row, sampling_row = QHBoxLayout(), QHBoxLayout()
        for row, pairs in ((model_row, (("Base", self.base_combo), ("Precision", self.quant_combo))),
                           (sampling_row, (("Temperature", self.temperature), ("Top-p", self.top_p),
                                           ("Top-k", self.top_k), ("Repetition penalty", self.repetition_penalty),
                                           ("Max tokens", self.max_tokens), ("Seed", self.seed)))):
            for caption, widget in pairs:
                label = QLabel(caption)
                label.setObjectName("muted")
                row.addWidget(label)
                row.addWidget(widget)
        model_row.addWidget(self.precision_note, 1)
        sampling_row.addWidget(self.sampling_note, 1)
        sampling_row.addWidget(self.reset_sampling)
        sampling_row.addWidget(self.save_sampling)
        rows = QVBoxLayout()
        rows.addLayout(model_row)
        rows.addLayout(sampling_row)
        # Not on every keystroke of a typed path: only once a base is picked or the typing is done.
        self.base_combo.activated.connect(self._base_changed)
        self.base_combo.lineEdit().editingFinished.connect(self._base_changed)
        self.quant_combo.currentTextChanged.connect(self._base_changed)
        for control in self._sampling_controls().values():
            control.valueChanged.connect(self._sampling_edited)
        return rows

    def _sampling_controls(self) -> dict:
        """The controls a persona's recommended settings fill in, by GenerationSettings field."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty}

    def _build_chat_tab(self) -> QWidget:
        self.persona_list = QListWidget()
        self.persona_list.setMinimumWidth(170)
        self.open_combo = QComboBox(placeholderText="All adapters are open")
        self.open_combo.setToolTip("Adapters in the library that are not open yet.")
        self.open_button = QPushButton("Open")
        self.title = QLabel()
        self.title.setObjectName("pageTitle")
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setPlaceholderText("(none)")
        self.system_prompt.setMaximumHeight(56)
        self.transcript = QTextBrowser()
        self.transcript.setOpenLinks(False)
        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("Type a message…  (Ctrl+Enter sends)")
        self.input.setMaximumHeight(72)
        self.send_button = QPushButton("Send")
        self.send_button.setObjectName("primary")
        self.stop_button = QPushButton("Stop")
        self.clear_button = QPushButton("Clear")
        self.save_button = QPushButton("Save as JSONL…")
        self.save_button.setToolTip("Save this conversation as an OpenAI-chat JSONL line the training wizard can learn from.")
        self.add_to_dataset_button = QPushButton("Add to dataset…")
        self.add_to_dataset_button.setToolTip("Append this conversation, with any replies you corrected (Edit reply), "
                                              "to a chat JSONL dataset you pick: a new file or one to grow.")

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        caption = QLabel("Personas")
        caption.setObjectName("muted")
        left_layout.addWidget(caption)
        left_layout.addWidget(self.persona_list, 1)
        open_row = QHBoxLayout()
        open_row.addWidget(self.open_combo, 1)
        open_row.addWidget(self.open_button)
        left_layout.addLayout(open_row)

        buttons = QHBoxLayout()
        buttons.addWidget(self.clear_button)
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.add_to_dataset_button)
        buttons.addStretch(1)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.send_button)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.title)
        prompt_caption = QLabel("System prompt (edit to change how this persona is instructed)")
        prompt_caption.setObjectName("muted")
        right_layout.addWidget(prompt_caption)
        right_layout.addWidget(self.system_prompt)
        right_layout.addWidget(self.transcript, 1)
        right_layout.addWidget(self.input)
        right_layout.addLayout(buttons)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([200, 700])

        self.persona_list.currentItemChanged.connect(self._show_current)
        self.open_button.clicked.connect(self._open_chosen)
        self.system_prompt.textChanged.connect(self._system_prompt_edited)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        self.clear_button.clicked.connect(self.clear)
        self.save_button.clicked.connect(self._save_conversation)
        self.add_to_dataset_button.clicked.connect(self._add_to_dataset)
        self.transcript.anchorClicked.connect(self._reply_link_clicked)
        self.input.installEventFilter(self)
        return splitter

    def _build_compare_tab(self) -> QWidget:
        self.compare_choices = [QComboBox() for _ in range(COMPARE_SLOTS)]
        self.compare_prompt = QLineEdit(placeholderText="One message, answered by every choice with the same settings and seed")
        self.compare_button = QPushButton("Compare")
        self.compare_button.setObjectName("primary")
        self.compare_stop = QPushButton("Stop")
        self.compare_note = QLabel()
        self.compare_note.setObjectName("muted")
        self.columns_area = QWidget()
        self.columns_layout = QHBoxLayout(self.columns_area)
        self.columns_layout.setContentsMargins(0, 0, 0, 0)
        self.compare_columns: list[Pending] = []
        """The current comparison: each choice's reply and the column showing it."""

        pickers = QGridLayout()
        for slot, combo in enumerate(self.compare_choices):
            label = QLabel(f"Choice {slot + 1}")
            label.setObjectName("muted")
            pickers.addWidget(label, 0, slot)
            pickers.addWidget(combo, 1, slot)
        prompt_row = QHBoxLayout()
        prompt_row.addWidget(self.compare_prompt, 1)
        prompt_row.addWidget(self.compare_stop)
        prompt_row.addWidget(self.compare_button)
        tab = QWidget()
        layout = QVBoxLayout(tab)
        layout.addLayout(pickers)
        layout.addLayout(prompt_row)
        layout.addWidget(self.compare_note)
        layout.addWidget(self.columns_area, 1)
        self.compare_button.clicked.connect(self.compare)
        self.compare_prompt.returnPressed.connect(self.compare)
        self.compare_stop.clicked.connect(self.stop)
        return tab

    # The contract with the main window

    @Slot(str)
    def open_persona(self, name: str) -> None:
        """Open a library adapter (or BASE) in chat: load it onto the base and make it the current persona."""
        self.banner.clear()
        if self._open(name):
            self._refresh_persona_list(select=name)
            self.tabs.setCurrentIndex(0)

    @Slot(bool)
    def set_training_active(self, active: bool) -> None:
        """Pause chat while training runs (see the module docstring); resume when it ends."""
        self.training_active = active
        if self._worker is not None:
            self._worker.paused_reason = TRAINING_PAUSE if active else None
        if active:
            self.pause_banner.show_message("Chat is paused while training runs.", TRAINING_PAUSE.split(": ", 1)[1], tone="warning")
            self.stop()
            self._release.emit()
        else:
            self.pause_banner.clear()
        self.mixer.set_busy(TRAINING_PAUSE if active else None)
        self._update_buttons()

    def shutdown(self) -> None:
        """Stop any reply and end the worker thread; waits for a model load in progress to finish."""
        self.serve_panel.shutdown()
        if self._thread is None:
            return
        self._worker.cancel_through(2**62)
        self._thread.quit()
        self._thread.wait()
        self._thread = None
        self._worker.drop_session()  # the thread has ended: let go of the shared model from here
        self._worker = None
        # The model went with the worker: panels must stop judging adapters against it.
        loaded_base().publish(None)

    @Slot()
    def _open_chosen(self) -> None:
        if self.open_combo.currentData():
            self.open_persona(self.open_combo.currentData())

    def _open(self, name: str) -> bool:
        """Add the persona to the chat and have the worker load it (again, if it failed before); False if unusable."""
        is_new = name not in self.personas
        if is_new:
            try:
                entry = self.library.get_usable(name)
            except TailorError as exc:
                self.banner.show_message(exc.message, exc.hint)
                return False
            recommended = GenerationSettings().with_sampling(entry.sampling).sampling()
            self.personas[name] = Persona(name, entry.system_prompt or "", recommended=recommended,
                                          recommended_by_persona=entry.sampling is not None, sampling=dict(recommended))
            self._refresh_choices()
        persona = self.personas[name]
        if name != BASE and not persona.is_preview and (is_new or persona.problem):
            persona.problem = None
            self._ensure_worker()
            self._open_persona.emit(name)
            if not self.training_active:
                self._set_status(f"Opening '{name}'…")
        return True

    # Chat

    def current_choice(self) -> str:
        item = self.persona_list.currentItem()
        return item.data(CHOICE_ROLE) if item is not None else BASE

    def select_persona(self, choice: str) -> None:
        self._refresh_persona_list(select=choice)

    def settings(self, seed: int | None = None) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_tokens.value(), temperature=self.temperature.value(),
                                  top_p=self.top_p.value(), top_k=self.top_k.value(),
                                  repetition_penalty=self.repetition_penalty.value(),
                                  seed=seed if seed is not None else (None if self.seed.value() < 0 else self.seed.value()))

    @Slot()
    def send(self) -> None:
        text = self.input.toPlainText().strip()
        choice = self.current_choice()
        persona = self.personas[choice]
        if not text or self.training_active or self._busy(choice):
            return
        if persona.problem:
            self.banner.show_message(f"'{choice}' cannot be used: {persona.problem}")
            return
        prompt = self._messages(choice, history(persona.turns) + [{"role": "user", "content": text}])
        persona.turns.append(Turn("user", text))
        reply = Turn("assistant", "", STREAMING)
        persona.turns.append(reply)
        self.input.clear()
        self._submit(Pending(choice, reply), prompt, self.settings())
        self._show_current()

    @Slot()
    def stop(self) -> None:
        if self._worker is not None and self.pending:
            self._worker.cancel_through(self._last_request)

    @Slot()
    def clear(self) -> None:
        choice = self.current_choice()
        if not self._busy(choice):
            self.personas[choice].turns.clear()
            self._show_current()

    def _save_conversation(self) -> None:
        choice = self.current_choice()
        persona = self.personas[choice]
        suggested = str(Path.home() / f"{choice}-conversation.jsonl")
        path, _ = QFileDialog.getSaveFileName(self, "Save conversation", suggested, "JSON Lines (*.jsonl)")
        if not path:
            return
        try:
            saved = save_conversation(path, history(persona.turns), persona.system_prompt or None)
        except (TailorError, OSError) as exc:
            self.banner.show_message(getattr(exc, "message", str(exc)), getattr(exc, "hint", None))
            return
        self.banner.show_message(f"Saved the conversation to {saved}.", "Use it as a dataset in the training wizard.", tone="success")

    # Corrected replies become training data

    @Slot(QUrl)
    def _reply_link_clicked(self, url: QUrl) -> None:
        if url.scheme() != "edit" or not url.path().isdigit():
            return
        index = int(url.path())
        turns = self.personas[self.current_choice()].turns
        if index >= len(turns) or turns[index].role != "assistant":
            return
        text, accepted = QInputDialog.getMultiLineText(self, "Edit reply", "The reply as the persona should have "
                                                       "written it (kept when you add the chat to a dataset):",
                                                       turns[index].content)
        if accepted:
            self.edit_reply(index, text)

    def edit_reply(self, index: int, text: str) -> None:
        """Replace the current persona's reply at `index` with the user's correction."""
        turn = self.personas[self.current_choice()].turns[index]
        if turn.role != "assistant" or turn.state not in (DONE, STOPPED) or not text.strip():
            return
        if text != turn.content:
            turn.content, turn.state, turn.edited = text, DONE, True
        self._show_current()

    def _add_to_dataset(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Add the conversation to a dataset", str(Path.home() / "corrected-chats.jsonl"),
            "JSON Lines (*.jsonl)", options=QFileDialog.Option.DontConfirmOverwrite)  # adding to a file is the point
        if path:
            self.add_to_dataset(path)

    def add_to_dataset(self, path: str) -> None:
        """Append the current conversation (corrections included) as one example to a chat JSONL file, atomically."""
        from app.core.chat import conversation_record
        from app.core.dataset_edit import append_example

        persona = self.personas[self.current_choice()]
        try:
            record = conversation_record(history(persona.turns), persona.system_prompt.strip() or None)
            saved = append_example(path, record)
        except (TailorError, OSError) as exc:
            self.banner.show_message(getattr(exc, "message", str(exc)), getattr(exc, "hint", None))
            return
        rows = sum(1 for line in saved.read_text(encoding="utf-8").splitlines() if line.strip())
        self.banner.show_message(f"Added the conversation to {saved} ({rows} example(s) there now).",
                                 "Train on it from the wizard's Dataset page.", tone="success")

    # Compare

    @Slot()
    def compare(self) -> None:
        prompt = self.compare_prompt.text().strip()
        choices = [combo.currentData() for combo in self.compare_choices if combo.currentData() != NO_CHOICE]
        if self.training_active or not prompt:
            return
        if len(choices) < 2 or len(set(choices)) != len(choices):
            self.banner.show_message("Pick two to four different choices to compare.")
            return
        self.banner.clear()
        if not all(self._open(choice) for choice in choices):
            return
        self._refresh_persona_list(select=self.current_choice())
        # One seed for every column: with sampling on, the differences then come from the adapters alone.
        settings = self.settings(seed=self.seed.value() if self.seed.value() >= 0 else random.randrange(2**31))
        self.compare_note.setText(f"Same settings for all: {settings.describe()}")
        self._clear_columns()
        for choice in choices:
            box = QGroupBox(self.personas[choice].label)
            browser = QTextBrowser()
            box_layout = QVBoxLayout(box)
            box_layout.addWidget(browser)
            if self._is_library_persona(self.personas[choice]):
                box_layout.addWidget(self._report_card_button(choice), 0, Qt.AlignmentFlag.AlignRight)
            self.columns_layout.addWidget(box, 1)
            column = Pending(choice, Turn("assistant", "", STREAMING), browser)
            self.compare_columns.append(column)
            self._submit(column, self._messages(choice, [{"role": "user", "content": prompt}]), settings)
            self._render_column(column)

    def _report_card_button(self, name: str) -> QPushButton:
        """Opens the same report card the library and the mixer show: the saved one, or Evaluate to make one."""
        from app.gui.report_card import open_report_card

        button = QPushButton("Report card")
        button.setToolTip(f"'{name}' against its base: style, loops, on topic and knowledge.")
        button.clicked.connect(lambda: open_report_card(self.library, name))
        return button

    def _clear_columns(self) -> None:
        while self.columns_layout.count():
            self.columns_layout.takeAt(0).widget().deleteLater()
        self.compare_columns.clear()

    # Mixer

    @Slot(str, object)
    def _request_preview(self, name: str, spec: MixSpec) -> None:
        self._previewing = name
        self._ensure_worker()
        self.mixer.set_busy(f"Building '{name}'…")
        self._preview_mix.emit(name, spec)

    @Slot(str, object)
    def _request_save(self, name: str, spec: MixSpec) -> None:
        self._ensure_worker()
        self.mixer.set_busy(f"Saving '{name}'…")
        self._save_mix.emit(name, spec)

    # From the worker

    @Slot(str)
    def _worker_status(self, text: str) -> None:
        self._set_status(text)

    @Slot(object)
    def _base_ready(self, profile) -> None:
        loaded_base().publish(profile)
        self._set_status(f"Loaded {profile.model_id}.")

    @Slot(str)
    def _persona_opened(self, name: str) -> None:
        self._set_status(f"'{name}' is ready.")

    @Slot(str, str)
    def _persona_failed(self, name: str, reason: str) -> None:
        if name in self.personas:
            self.personas[name].problem = reason
            self._refresh_persona_list(select=self.current_choice())
        self.banner.show_message(f"'{name}' cannot be used.", reason)

    @Slot(str, object)
    def _mix_ready(self, name: str, system_prompt: str | None) -> None:
        if name not in self.personas:
            self.personas[name] = Persona(f"{name} (mix preview)", system_prompt or "", is_preview=True)
        # Previewing again with other weights keeps the conversation: that is how the weights get compared.
        self._refresh_choices()
        if self._previewing == name:
            self._previewing = None
            self.mixer.set_busy(None)
            self._refresh_persona_list(select=name)
            self.tabs.setCurrentIndex(0)
            self._set_status(f"Mix '{name}' is ready to try; save it from the Mixer tab to keep it.")
        else:
            self._refresh_persona_list(select=self.current_choice())

    @Slot(str)
    def _mix_saved(self, name: str) -> None:
        persona = self.personas.get(name)
        if persona is not None:
            persona.label, persona.is_preview = name, False
        self.mixer.set_busy(None)
        self.mixer.refresh()
        self._refresh_choices()
        self._refresh_persona_list(select=self.current_choice())
        self.banner.show_message(f"Saved the mix '{name}' in the library.", tone="success")

    @Slot(str, str)
    def _mix_failed(self, name: str, reason: str) -> None:
        self.mixer.set_busy(None)
        self.banner.show_message(f"The mix '{name}' could not be made.", reason)

    @Slot(str)
    def _precision_chosen(self, description: str) -> None:
        # The first clause (what and why) fits beside the combo; the rest (the dtype's reason) is in the tooltip.
        self.precision_note.setText(description.split(";")[0] + ".")
        self.precision_note.setToolTip(description)

    @Slot(int, str)
    def _reply_trimmed(self, request_id: int, note: str) -> None:
        pending = self.pending.get(request_id)
        if pending is not None:
            pending.turn.note = note
            self._render_pending(pending)

    @Slot(int, str)
    def _reply_piece(self, request_id: int, piece: str) -> None:
        pending = self.pending.get(request_id)
        if pending is not None:
            pending.turn.content += piece
            self._render_pending(pending)

    @Slot(int, str, bool)
    def _reply_done(self, request_id: int, text: str, stopped: bool) -> None:
        pending = self.pending.pop(request_id, None)
        if pending is not None:
            pending.turn.content = text
            pending.turn.state = STOPPED if stopped else DONE
            self._render_pending(pending)
        self._update_buttons()

    @Slot(int, str)
    def _reply_failed(self, request_id: int, message: str) -> None:
        pending = self.pending.pop(request_id, None)
        if pending is not None:
            pending.turn.content, pending.turn.state = message, FAILED
            self._render_pending(pending)
        self._update_buttons()

    # Plumbing

    def _ensure_worker(self) -> ChatWorker:
        if self._worker is not None:
            return self._worker
        worker = ChatWorker(self.library)
        worker.paused_reason = TRAINING_PAUSE if self.training_active else None
        thread = QThread()
        thread.setObjectName("ChatWorker")
        worker.moveToThread(thread)
        self._configure_base.connect(worker.configure_base)
        self._open_persona.connect(worker.open_persona)
        self._generate.connect(worker.generate)
        self._preview_mix.connect(worker.preview_mix)
        self._save_mix.connect(worker.save_mix)
        self._release.connect(worker.release)
        worker.status.connect(self._worker_status)
        worker.precision_chosen.connect(self._precision_chosen)
        worker.reply_trimmed.connect(self._reply_trimmed)
        worker.base_ready.connect(self._base_ready)
        worker.persona_opened.connect(self._persona_opened)
        worker.persona_failed.connect(self._persona_failed)
        worker.mix_ready.connect(self._mix_ready)
        worker.mix_saved.connect(self._mix_saved)
        worker.mix_failed.connect(self._mix_failed)
        worker.reply_piece.connect(self._reply_piece)
        worker.reply_done.connect(self._reply_done)
        worker.reply_failed.connect(self._reply_failed)
        thread.start()
        self._thread, self._worker = thread, worker
        self._configured_base = self._chosen_base()
        self._configure_base.emit(*self._configured_base)
        return worker

    def _submit(self, pending: Pending, messages: list[dict[str, str]], settings: GenerationSettings) -> None:
        self._ensure_worker()
        request_id = next(self._request_ids)
        self._last_request = request_id
        self.pending[request_id] = pending
        self._generate.emit(ReplyRequest(request_id, pending.choice, messages, settings))
        self._update_buttons()

    def _messages(self, choice: str, conversation: list[dict[str, str]]) -> list[dict[str, str]]:
        return ChatSession.prompt_messages(conversation, self.personas[choice].system_prompt.strip() or None)

    def _busy(self, choice: str) -> bool:
        return any(pending.choice == choice and pending.column is None for pending in self.pending.values())

    def _chosen_base(self) -> tuple[str, str]:
        return self.base_combo.currentText().strip() or AUTO_BASE, self.quant_combo.currentText()

    @Slot()
    def _base_changed(self) -> None:
        # editingFinished also fires when the field merely loses focus; only a real change reloads anything.
        if self._worker is None or self._chosen_base() == self._configured_base:
            return
        self._configured_base = self._chosen_base()
        self._configure_base.emit(*self._configured_base)
        self.precision_note.setText("Chosen when the model loads.")
        # Personas reload onto the new base with the next message; a misfit there is reported then.
        for persona in self.personas.values():
            persona.problem = None
        self._refresh_persona_list(select=self.current_choice())

    def _render_pending(self, pending: Pending) -> None:
        if pending.column is not None:
            self._render_column(pending)
        elif pending.choice == self.current_choice():
            self._show_current()

    def _render_column(self, pending: Pending) -> None:
        pending.column.setHtml(render_turns([pending.turn], None))

    @Slot()
    def _show_current(self, *_) -> None:
        choice = self.current_choice()
        persona = self.personas[choice]
        self.title.setText(persona.label)
        self.system_prompt.blockSignals(True)
        self.system_prompt.setPlainText(persona.system_prompt)
        self.system_prompt.blockSignals(False)
        self.system_prompt.setReadOnly(False)
        self._show_sampling(persona)
        scrollbar = self.transcript.verticalScrollBar()
        at_end = scrollbar.value() >= scrollbar.maximum() - 4
        self.transcript.setHtml(render_turns(persona.turns, persona.label, editable=True) or
                                f"<p style='color:{MUTED}'>Say something to {html.escape(persona.label)}.</p>")
        if at_end:
            scrollbar.setValue(scrollbar.maximum())
        self._update_buttons()

    def _show_sampling(self, persona: Persona) -> None:
        """Put the persona's current decoding into the controls, and say whether it is the recommended one."""
        for name, control in self._sampling_controls().items():
            control.blockSignals(True)
            control.setValue(persona.sampling[name])
            control.blockSignals(False)
        source = (f"the settings '{html.escape(persona.label)}' recommends" if persona.recommended_by_persona
                  else "Tailor's default settings")
        changed = persona.sampling != persona.recommended
        # Short when changed: beside Reset and Save as defaults it must fit a narrow window; the tooltip says more.
        self.sampling_note.setText(f"<b style='color:{ACCENT}'>Changed</b> by you." if changed
                                   else source[0].upper() + source[1:] + ".")
        self.sampling_note.setToolTip((f"Changed from {source}. " if changed else "") + "Recommended: " + ", ".join(
            f"{key.replace('_', ' ')} {value:g}" for key, value in persona.recommended.items()))
        self.reset_sampling.setEnabled(changed)
        self.save_sampling.setEnabled(changed and self._is_library_persona(persona) and self._sampling_save is None)

    def _is_library_persona(self, persona: Persona) -> bool:
        """Saved in the library (not the bare base, nor a mix still in preview): it has a manifest to write to."""
        return persona is not self.personas[BASE] and not persona.is_preview

    @Slot()
    def _sampling_edited(self) -> None:
        persona = self.personas[self.current_choice()]
        persona.sampling = {name: control.value() for name, control in self._sampling_controls().items()}
        self._show_sampling(persona)

    @Slot()
    def _reset_sampling(self) -> None:
        persona = self.personas[self.current_choice()]
        persona.sampling = dict(persona.recommended)
        self._show_sampling(persona)

    @Slot()
    def _save_sampling(self) -> None:
        """Write the current controls into the persona's manifest, on a worker: the library's lock may be held by a
        training that is publishing, for seconds."""
        choice = self.current_choice()
        persona = self.personas[choice]
        if not self._is_library_persona(persona) or self._sampling_save is not None:
            return
        sampling = dict(persona.sampling)
        self._sampling_save = run_function(lambda report: recommend_sampling(self.library, choice, sampling))
        self._sampling_save.succeeded.connect(lambda entry: self._sampling_saved(choice, entry))
        self._sampling_save.failed.connect(lambda failure: self.banner.show_message(failure.message, failure.hint))
        self._sampling_save.finished.connect(self._sampling_save_ended)
        self.save_sampling.setEnabled(False)

    def _sampling_saved(self, choice: str, entry) -> None:
        persona = self.personas.get(choice)
        if persona is None:
            return
        persona.recommended = GenerationSettings().with_sampling(entry.sampling).sampling()
        persona.recommended_by_persona = True
        self.banner.show_message(f"Saved these settings as the ones '{choice}' recommends.", tone="success")

    @Slot()
    def _sampling_save_ended(self) -> None:
        self._sampling_save = None
        self._show_sampling(self.personas[self.current_choice()])

    @Slot()
    def _system_prompt_edited(self) -> None:
        self.personas[self.current_choice()].system_prompt = self.system_prompt.toPlainText()

    def _refresh_persona_list(self, select: str) -> None:
        self.persona_list.blockSignals(True)
        self.persona_list.clear()
        for choice, persona in self.personas.items():
            item = QListWidgetItem(persona.label)
            item.setData(CHOICE_ROLE, choice)
            if persona.problem:
                item.setIcon(self.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxWarning))
                item.setToolTip(persona.problem)
            self.persona_list.addItem(item)
            if choice == select:
                self.persona_list.setCurrentItem(item)
        self.persona_list.blockSignals(False)
        self._show_current()

    @Slot()
    def _library_changed(self) -> None:
        self.mixer.refresh()
        self._refresh_choices()

    def _refresh_choices(self) -> None:
        """The 'open' list (library adapters not open yet) and the compare pickers (everything there is)."""
        entries = [entry for entry in self.library.entries() if entry.ok]
        self.open_combo.clear()
        for entry in entries:
            if entry.name not in self.personas:
                self.open_combo.addItem(entry.name, entry.name)
        self.open_combo.setCurrentIndex(0 if self.open_combo.count() else -1)  # with a placeholder, none is picked by itself
        self.open_button.setEnabled(self.open_combo.count() > 0)
        everything = [(persona.label, choice) for choice, persona in self.personas.items()]
        everything += [(entry.name, entry.name) for entry in entries if entry.name not in self.personas]
        for slot, combo in enumerate(self.compare_choices):
            previous = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            combo.addItem("—", NO_CHOICE)
            for label, choice in everything:
                combo.addItem(label, choice)
            default = everything[slot][1] if slot < 2 and slot < len(everything) else NO_CHOICE
            index = combo.findData(previous if previous is not None else default)
            combo.setCurrentIndex(max(index, 0))
            combo.blockSignals(False)

    def _update_buttons(self) -> None:
        choice = self.current_choice()
        ready = not self.training_active
        self.send_button.setEnabled(ready and not self._busy(choice))
        # A new comparison replaces the columns, so the one still answering must finish or be stopped first.
        self.compare_button.setEnabled(ready and not any(pending.column for pending in self.pending.values()))
        self.stop_button.setEnabled(bool(self.pending))
        self.compare_stop.setEnabled(bool(self.pending))
        self.clear_button.setEnabled(not self._busy(choice))
        self.save_button.setEnabled(any(message["role"] == "assistant" for message in history(self.personas[choice].turns)))
        self.add_to_dataset_button.setEnabled(self.save_button.isEnabled())

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    def eventFilter(self, watched, event) -> bool:
        if (watched is self.input and event.type() == QEvent.Type.KeyPress
                and event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter)
                and event.modifiers() & Qt.KeyboardModifier.ControlModifier):
            self.send()
            return True
        return super().eventFilter(watched, event)

