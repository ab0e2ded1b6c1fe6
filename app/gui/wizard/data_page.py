"""Step 2: the dataset. Pick or drop a file, or make one from a chat export; edit, filter and dedupe its examples in
the dataset editor; see its format, problems, lengths and the selected example as the model sees it (masking)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView, QComboBox, QDialog, QFileDialog, QGroupBox, QHBoxLayout, QHeaderView, QLabel, QMenu,
    QMessageBox, QPushButton, QSplitter, QStackedWidget, QTableWidget, QTableWidgetItem, QToolButton, QVBoxLayout,
    QWidget,
)

from app.core.config import DATA_FORMATS, DataSettings
from app.gui import settings
from app.gui.dataset_editor import ConvertDialog, DatasetEditor, Row, collector_paused, freeze_heap, make_rows
from app.gui.wizard.base import DatasetInfo, WizardContext, WizardPage
from app.gui.wizard.field_docs import tooltip
from app.gui.wizard.widgets import ExampleView, PathField, TokenHistogram, legend_html

SAMPLE_DATASETS = Path(__file__).resolve().parents[3] / "resources" / "datasets"
FIRST_SAMPLE = "pirate.jsonl"
"""Pre-selected so a newcomer can train a first persona without choosing anything."""
DATASET_FILTER = "Datasets (*.jsonl *.json *.csv *.parquet *.txt);;All files (*)"
FORMAT_NAMES = {
    "auto": "Detect automatically", "openai": "OpenAI chat (messages)", "sharegpt": "ShareGPT (conversations)",
    "alpaca": "Alpaca (instruction / output)", "text": "Plain text", "prompt_response": "Prompt / response columns",
    "hf_disk": "Saved with datasets (folder)",
}


def sample_datasets() -> list[Path]:
    """The datasets Tailor ships, the newcomer's first choice first."""
    if not SAMPLE_DATASETS.is_dir():
        return []
    files = [path for path in SAMPLE_DATASETS.iterdir() if path.suffix in (".jsonl", ".csv")]
    return sorted(files, key=lambda path: (path.name != FIRST_SAMPLE, path.name))


def inspect_dataset(path: str, format: str, prompt_column: str | None, response_column: str | None, tokenizer,
                    max_len: int, system_prompt: str | None, report: Callable[[str], None]) -> DatasetInfo:
    """Load, validate and count tokens (raises DatasetError listing bad lines). Runs on a worker thread."""
    from app.core.data import build_report, example_segments, load_dataset_file, measure_dataset

    with collector_paused():
        loaded = load_dataset_file(path, format, prompt_column, response_column)
    freeze_heap()
    report(f"Counting tokens in {loaded.rows:,} examples…")
    usable, lengths = measure_dataset(tokenizer, loaded, max_len, system_prompt)
    dataset_report = build_report(loaded, lengths, usable, max_len)
    if loaded.format == "text":
        segments = [(loaded.texts[0], True)]
    else:
        segments = example_segments(tokenizer, loaded.conversations[0], system_prompt, max_len)
    return DatasetInfo(path=path, format=format, prompt_column=prompt_column, response_column=response_column,
                       loaded=loaded, report=dataset_report, segments=segments, tokenizer=tokenizer)


class DataPage(WizardPage):
    title = "Choose the dataset"
    subtitle = ("Examples of how the persona should answer: a .jsonl of chats, a CSV of prompts and responses, "
                "plain text… Drop a file anywhere on this page, or browse; or make one from a chat export or a "
                "script. Double-click a cell to edit it.")

    def __init__(self, context: WizardContext, max_len: Callable[[], int], system_prompt: Callable[[], str | None],
                 parent: QWidget | None = None):
        super().__init__(context, parent)
        self._max_len = max_len
        self._system_prompt = system_prompt
        self.setAcceptDrops(True)

        self.path_field = PathField("Drop a dataset file here, or browse…", self._pick_file)
        self.path_field.edit.setAcceptDrops(False)  # let the page take the drop, not paste a file:// URL as text
        self.path_field.setToolTip(tooltip(DataSettings, "path"))
        self.samples_button = QToolButton()
        self.samples_button.setText("Samples")
        self.samples_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        samples = QMenu(self.samples_button)
        for sample in sample_datasets():
            samples.addAction(sample.stem, lambda chosen=sample: self.set_path(str(chosen)))
        self.samples_button.setMenu(samples)
        self.samples_button.setEnabled(bool(sample_datasets()))
        self.convert_button = QPushButton("From a chat…")
        self.convert_button.setToolTip("Make a dataset from a WhatsApp, Telegram or Discord export, or from a "
                                       "transcript or script: one participant's replies become the persona's.")
        self.format_combo = QComboBox()
        for key in DATA_FORMATS:
            self.format_combo.addItem(FORMAT_NAMES[key], key)
        self.format_combo.setToolTip(tooltip(DataSettings, "format"))
        self.detected = QLabel()
        self.detected.setObjectName("muted")
        self.prompt_column = QComboBox()
        self.prompt_column.setToolTip(tooltip(DataSettings, "prompt_column"))
        self.response_column = QComboBox()
        self.response_column.setToolTip(tooltip(DataSettings, "response_column"))
        self.columns_row = QWidget()
        columns_layout = QHBoxLayout(self.columns_row)
        columns_layout.setContentsMargins(0, 0, 0, 0)
        columns_layout.addWidget(QLabel("Prompt column:"))
        columns_layout.addWidget(self.prompt_column)
        columns_layout.addSpacing(12)
        columns_layout.addWidget(QLabel("Response column:"))
        columns_layout.addWidget(self.response_column)
        columns_layout.addStretch(1)
        self.columns_row.hide()

        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.checks = QLabel()
        self.checks.setWordWrap(True)
        self.checks.setObjectName("muted")
        self.editor = DatasetEditor()
        self.table = QTableWidget()
        """Plain-text datasets are shown as they are, not edited."""
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setWordWrap(False)
        self.table.setAcceptDrops(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.histogram = TokenHistogram()
        self.histogram.setMinimumHeight(120)
        self.example = ExampleView()
        self.example.setMinimumHeight(80)
        legend = QLabel(legend_html())
        legend.setWordWrap(True)
        legend.setObjectName("muted")

        top = QHBoxLayout()
        top.addWidget(QLabel("File:"))
        top.addWidget(self.path_field, 1)
        top.addWidget(self.samples_button)
        top.addWidget(self.convert_button)
        top.addSpacing(12)
        top.addWidget(QLabel("Format:"))
        top.addWidget(self.format_combo)
        top.addWidget(self.detected)

        rows_box = QGroupBox("Examples")
        self.rows_stack = QStackedWidget()
        self.rows_stack.addWidget(self.editor)
        self.rows_stack.addWidget(self.table)
        QVBoxLayout(rows_box).addWidget(self.rows_stack)
        lengths_box = QGroupBox("Tokens per example")
        QVBoxLayout(lengths_box).addWidget(self.histogram)
        example_box = QGroupBox("The selected example as the model sees it")
        example_layout = QVBoxLayout(example_box)
        example_layout.addWidget(self.example, 1)
        example_layout.addWidget(legend)
        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(lengths_box)
        right.addWidget(example_box)
        right.setSizes([200, 260])
        panes = QSplitter(Qt.Orientation.Horizontal)
        panes.addWidget(rows_box)
        panes.addWidget(right)
        panes.setSizes([560, 640])
        panes.setChildrenCollapsible(False)

        layout = QVBoxLayout(self.body)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.columns_row)
        layout.addWidget(self.summary)
        layout.addWidget(self.checks)
        layout.addWidget(panes, 1)

        self.path_field.edit.editingFinished.connect(self._path_changed)
        self.format_combo.currentIndexChanged.connect(self._format_changed)
        self.prompt_column.activated.connect(self._columns_chosen)
        self.response_column.activated.connect(self._columns_chosen)
        self.convert_button.clicked.connect(self._ask_convert)
        self.editor.analysis_ready.connect(self._analysed)
        self.editor.selection_changed.connect(self._show_example)
        self.editor.saved.connect(self._saved_as)
        self.editor.failed.connect(self.show_failure)
        self._columns_overridden = False
        self._converted_from: str | None = None
        self._shown: tuple | None = None
        """The file, format and columns the editor's rows came from (what Cancel on unsaved edits puts back)."""
        self._after_save: Callable[[], None] | None = None
        """What the user chose before saving their edits (another file, a format): done once the save is written."""
        self._asking = False
        default = sample_datasets()
        if default:
            self.path_field.edit.setText(str(default[0]))

    # Inputs

    def set_path(self, path: str) -> None:
        self.path_field.edit.setText(path)
        self._path_changed()

    def _path_changed(self) -> None:
        if self._replaces_edits() and not self._edits_may_go(f"Opening {Path(self.path_field.text()).name}",
                                                              self._path_changed):
            return
        loaded = self.context.dataset
        if loaded is None or loaded.path != self.path_field.text():
            self._set_column_choices([])  # another file's columns mean nothing here
        self._inputs_changed()

    def set_format(self, format: str) -> None:
        self.format_combo.setCurrentIndex(max(0, self.format_combo.findData(format)))

    def format(self) -> str:
        return self.format_combo.currentData()

    def columns(self) -> tuple[str | None, str | None]:
        """The prompt/response columns the user chose, or (None, None) to let the loader detect them."""
        if not self._columns_overridden:
            return None, None
        return self.prompt_column.currentText(), self.response_column.currentText()

    def _columns_chosen(self) -> None:
        self._columns_overridden = True
        if self._replaces_edits() and not self._edits_may_go("Reading other columns", self._inputs_changed):
            return
        self._inputs_changed()

    def _format_changed(self) -> None:
        if self._replaces_edits() and not self._edits_may_go(
                f"Reading the file as {FORMAT_NAMES[self.format()]}", self._inputs_changed):
            return
        self._inputs_changed()

    # Unsaved edits

    def _replaces_edits(self) -> bool:
        """Whether reading the file, format and columns chosen now would replace rows edited and not saved."""
        return self.editor.dirty and bool(self.path_field.text()) and self._request()[:4] != self._shown

    def _edits_may_go(self, change: str, proceed: Callable[[], None]) -> bool:
        """Before `change` replaces unsaved edits: Save, Discard or Cancel. True: go ahead now. False: not now;
        Cancel (or no file chosen to save to, or a save that fails) puts back what the rows came from, and Save
        does `proceed` once the file is written."""
        if not self.editor.dirty:
            return True
        if self._after_save is not None:  # saving already: the latest choice follows when it is written
            self._after_save = proceed
            return False
        if self._asking:  # the question took the focus from the path field, which may say it was edited again
            return False
        buttons = QMessageBox.StandardButton
        self._asking = True
        try:
            answer = self.editor.ask_about_unsaved_edits(change)
        finally:
            self._asking = False
        if answer == buttons.Discard:
            self.editor.dirty = False
            return True
        path = self.editor.choose_save_path() if answer == buttons.Save else None
        if path:
            self._after_save = proceed
            self.editor.save_to(path).failed.connect(self._save_before_change_failed)
        else:
            self._restore_shown()
        return False

    def _save_before_change_failed(self, failure) -> None:
        self._after_save = None
        self._restore_shown()  # the edits are still only here: show where they came from, not the new choice

    def _restore_shown(self) -> None:
        """The file, format and columns the editor's rows came from, back in their fields, without reading anything."""
        if self._shown is None:
            return
        path, format, prompt_column, response_column = self._shown
        self.path_field.edit.setText(path)
        self.format_combo.blockSignals(True)
        self.set_format(format)
        self.format_combo.blockSignals(False)
        info = self.context.dataset
        if info is not None and info.report.format == "prompt_response":
            self._columns_overridden = prompt_column is not None
            for combo, column in zip((self.prompt_column, self.response_column),
                                     (prompt_column, response_column) if prompt_column else columns_used(info)):
                combo.setCurrentText(column)

    def _request(self) -> tuple:
        """Everything the loaded dataset depends on; a result for other inputs is stale."""
        return (self.path_field.text(), self.format(), *self.columns(), id(self.context.model.tokenizer))

    def _loaded_request(self) -> tuple | None:
        info = self.context.dataset
        if info is None:
            return None
        return (info.path, info.format, info.prompt_column, info.response_column, id(info.tokenizer))

    def _pick_file(self) -> str:
        return QFileDialog.getOpenFileName(self, "Choose a dataset", settings.last_folder(), DATASET_FILTER)[0]

    def dragEnterEvent(self, event) -> None:
        if self._dropped_path(event) is not None:
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        path = self._dropped_path(event)
        if path is not None:
            event.acceptProposedAction()
            self.set_path(path)

    @staticmethod
    def _dropped_path(event) -> str | None:
        urls = event.mimeData().urls() if event.mimeData().hasUrls() else []
        local = [url.toLocalFile() for url in urls if url.isLocalFile()]
        return local[0] if local else None

    # Loading

    def enter(self) -> None:
        if self.editor.dirty:
            return  # coming back to unsaved edits: reloading the file would throw them away
        if self.context.model is not None and self.path_field.text() and self._loaded_request() != self._request():
            self._load()

    def _inputs_changed(self) -> None:
        if self.context.model is not None and self.path_field.text() and self._loaded_request() != self._request():
            self._load()

    def _load(self) -> None:
        path, format, prompt_column, response_column, _ = request = self._request()
        tokenizer, max_len, system_prompt = self.context.model.tokenizer, self._max_len(), self._system_prompt()
        self.context.dataset = None
        freeze_heap()  # the loader makes a row's worth of objects per example; collections then skip the rest

        def work(report) -> tuple[DatasetInfo, list[Row]]:
            info = inspect_dataset(path, format, prompt_column, response_column, tokenizer, max_len, system_prompt,
                                   report)
            # The editor's rows too: making 50,000 of them would stall the window for 0.1 s.
            editable = info.report.format != "text"
            return info, make_rows(info.loaded.conversations, info.report.token_lengths) if editable else []

        self.run_job(work, f"Reading {Path(path).name}…", lambda result: self._loaded(request, *result),
                     lambda failure: self._failed(request, failure))

    def _loaded(self, request: tuple, info: DatasetInfo, rows: list[Row]) -> None:
        if request != self._request():
            return  # the user changed the file or format meanwhile; a newer load is on its way
        self.context.dataset = info
        self._show(info, rows)

    def _failed(self, request: tuple, failure) -> None:
        if request != self._request():
            return
        self.context.dataset = None
        self._clear()
        self.show_failure(failure)

    def _clear(self) -> None:
        self.summary.clear()
        self.checks.clear()
        self.detected.clear()
        self.editor.clear()
        self.table.clear()
        self.table.setRowCount(0)
        self.table.setColumnCount(0)
        self.histogram.show_lengths([], self._max_len())
        self.example.show_segments([])

    def _show(self, info: DatasetInfo, rows: list[Row]) -> None:
        report = info.report
        self.detected.setText(f"detected: {FORMAT_NAMES[report.format]}" if info.format == "auto" else "")
        self._show_columns(info)
        self._converted_from = None
        self._shown = (info.path, info.format, info.prompt_column, info.response_column)
        if report.format != "text":
            self.rows_stack.setCurrentWidget(self.editor)
            self.editor.show_rows(rows, self._max_len(), info.tokenizer, self._system_prompt())
        else:
            self.editor.clear()
            self.rows_stack.setCurrentWidget(self.table)
        headers, rows = preview_table(info)
        self.table.clear()
        self.table.setColumnCount(len(headers))
        self.table.setHorizontalHeaderLabels(headers)
        if headers[-1] == "turns":
            self.table.horizontalHeader().setSectionResizeMode(len(headers) - 1,
                                                               QHeaderView.ResizeMode.ResizeToContents)
        self.table.setRowCount(len(rows))
        for row, values in enumerate(rows):
            for column, value in enumerate(values):
                item = QTableWidgetItem(value)
                item.setToolTip(value)
                self.table.setItem(row, column, item)
        self.histogram.show_lengths(report.token_lengths, self._max_len())
        self.example.show_segments(info.segments)
        self.update_summary()

    def _show_columns(self, info: DatasetInfo) -> None:
        is_table = info.report.format == "prompt_response"
        self.columns_row.setVisible(is_table)
        if is_table:
            self._set_column_choices(info.report.columns, columns_used(info))

    def _set_column_choices(self, columns: list[str], chosen: tuple[str, str] = ("", "")) -> None:
        """Offer the file's columns, showing the pair in use (the loader needs both once the user picks one)."""
        for combo, current in zip((self.prompt_column, self.response_column), chosen):
            combo.clear()
            combo.addItems(columns)
            combo.setCurrentText(current)
        if not columns:
            self._columns_overridden = False
            self.columns_row.hide()

    def set_max_len(self, max_len: int) -> None:
        """Called when the max length changes on the Adapter page: move the line and recount what gets cut."""
        self.histogram.set_max_len(max_len)
        self.editor.set_max_len(max_len)
        self.update_summary()

    def update_summary(self) -> None:
        info = self.context.dataset
        editing = self.rows_stack.currentWidget() is self.editor and self.editor.model.rows
        if info is None and not editing:
            self.summary.clear()
            return
        if editing:  # the rows as edited, which may differ from the file
            lengths = self.editor.lengths() or [0]
            rows = len(self.editor.model.rows)
            usable = self.editor.report.usable if self.editor.report else rows
        else:
            lengths, rows, usable = info.report.token_lengths, info.report.rows, info.report.usable_rows
        cut = self.histogram.cut_count()
        unsaved = ""
        if self.editor.dirty:
            origin = f"converted from {self._converted_from}, " if self._converted_from else ""
            unsaved = f"<span style='color:#b7791f'><b>Not saved</b> ({origin}use Save as… to train on it)</span> · "
        self.summary.setText(
            unsaved + f"<b>{rows:,} examples</b> ({usable:,} with a reply to learn from) · "
            f"tokens per example: median {statistics.median(lengths):.0f}, longest {max(lengths):,} · "
            + (f"<span style='color:#b7791f'><b>{cut:,}</b> longer than the max length "
               f"({self.histogram.max_len}) will be cut</span>" if cut else
               f"all fit in the max length ({self.histogram.max_len})"))

    def validate(self) -> str | None:
        if self.editor.dirty:
            return ("You changed the examples here: save them with Save as… (training reads a file), "
                    "or undo the changes.")
        if not self.path_field.text():
            return "Choose a dataset file (or drop one on this page)."
        if self.context.dataset is None:
            return self.banner.plain_text or "The dataset has not been read yet."
        if self.context.dataset.report.usable_rows == 0:
            return "No example has an assistant reply within the max length; raise the max length on the next page."
        return None

    # Editing

    def _analysed(self, report) -> None:
        """The editor re-checked every row: redraw the lengths, the summary and the validation report."""
        self.histogram.show_lengths(report.lengths, self._max_len())
        self.checks.setText("<br>".join(f"⚠ {warning}" for warning in report.warnings()))
        self.update_summary()

    def _show_example(self, messages) -> None:
        """The masking preview follows the selected example, and its edits."""
        tokenizer = self.context.model.tokenizer if self.context.model is not None else None
        if not messages or tokenizer is None:
            self.example.show_segments([])
            return
        from app.core.data import example_segments
        from app.core.errors import TailorError

        try:
            self.example.show_segments(example_segments(tokenizer, messages, self._system_prompt(), self._max_len()))
        except TailorError as exc:  # a template that refuses this turn order: say so where the preview would be
            self.example.show_segments([(exc.message, False)])

    def _saved_as(self, path: str) -> None:
        proceed, self._after_save = self._after_save, None
        count = len(self.editor.model.rows)
        if proceed:
            proceed()  # the other file or format the user chose before saving
        else:
            self.set_path(path)
        # After the load it starts, which clears the banner.
        self.banner.show_message(f"Saved {count:,} examples to {path}.",
                                 None if proceed else "Training will use this file.", tone="success")

    def _ask_convert(self) -> None:
        dialog = ConvertDialog(self)
        if dialog.exec() == QDialog.DialogCode.Accepted:
            self.convert(**dialog.request())

    def convert(self, path: str, source: str, persona: str, gap_hours: float, anonymise: bool) -> None:
        """Convert a chat export on a worker thread and open the result in the editor, unsaved."""
        if not self._edits_may_go(f"Converting {Path(path).name}",
                                  lambda: self.convert(path, source, persona, gap_hours, anonymise)):
            return
        if self.context.model is None:
            self.banner.show_message("Choose a base model first: the examples are counted with its tokenizer.")
            return
        from app.core.converters import convert_export
        from app.core.dataset_edit import token_lengths

        tokenizer, system_prompt = self.context.model.tokenizer, self._system_prompt()

        def work(report):
            with collector_paused():
                conversion = convert_export(path, source, persona, gap_hours, anonymise)
            freeze_heap()
            report(f"Counting tokens in {len(conversion.examples):,} examples…")
            conversations = [example["messages"] for example in conversion.examples]
            lengths = token_lengths(tokenizer, conversations, system_prompt)
            return conversion, make_rows(conversations, lengths), lengths

        freeze_heap()
        self.run_job(work, f"Converting {Path(path).name}…", self._converted)

    def _converted(self, result) -> None:
        conversion, rows, lengths = result
        self.context.dataset = None
        self._converted_from = Path(conversion.report.path).name
        self.rows_stack.setCurrentWidget(self.editor)
        self.columns_row.hide()
        self.detected.clear()
        self.editor.show_rows(rows, self._max_len(), self.context.model.tokenizer, self._system_prompt(), dirty=True)
        self.path_field.edit.clear()  # the file shown before is not what the editor holds now
        self._shown = self._request()[:4]
        self.banner.show_message(" · ".join(conversion.report.to_text().splitlines()),
                                 "Check the examples, then Save as… to train on them.", tone="info")
        self.histogram.show_lengths(lengths, self._max_len())
        self.update_summary()

    def advance(self, proceed: Callable[[], None]) -> None:
        if not self.is_busy and self.path_field.text() and self._loaded_request() != self._request():
            self._load()
        super().advance(proceed)


def preview_table(info: DatasetInfo) -> tuple[list[str], list[list[str]]]:
    """Headers and cells for the first rows. Chats read better as who-said-what than as raw JSON; tables and
    text are shown as they are in the file."""
    report = info.report
    if report.format in ("openai", "sharegpt"):
        conversations = info.loaded.conversations[:len(report.preview)]
        return ["user", "assistant", "turns"], [
            [_first(messages, "user"), _first(messages, "assistant"), str(len(messages))] for messages in conversations]
    return report.columns, [[str(row.get(name, "")) for name in report.columns] for row in report.preview]


def _first(messages: list[dict[str, str]], role: str) -> str:
    return next((message["content"] for message in messages if message["role"] == role), "")


def columns_used(info: DatasetInfo) -> tuple[str, str]:
    """The prompt and response columns the loader picked, found by matching its first example to the first row.

    The loader does not report which pair it detected; the first conversation's user and assistant texts are the
    first row's prompt and response cells (the preview cuts long cells and ends them with '…').
    """
    if info.prompt_column and info.response_column:
        return info.prompt_column, info.response_column
    messages, row = info.loaded.conversations[0], info.report.preview[0]

    def column_holding(text: str) -> str:
        return next((name for name, cell in row.items()
                     if cell == text or cell.endswith("…") and text.startswith(cell[:-1])), "")

    return column_holding(_first(messages, "user")), column_holding(_first(messages, "assistant"))
