"""The dataset editor on the Dataset page: a table of examples to edit, filter, dedupe and save as chat JSONL.

Model/view all the way down, so 50,000 rows stay responsive: `ExamplesModel` shows rows in batches (Qt asks for more
through canFetchMore/fetchMore as the user scrolls), and every change goes through a QUndoStack command, so edit,
delete and add can all be undone. The work that looks at every row (duplicates, the validation report) runs on a
worker thread a moment after the last edit (`DatasetEditor.analysis_ready`); a row's token count is recounted on its
own when it changes, which takes a millisecond or two.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QKeySequence, QUndoCommand, QUndoStack
from PySide6.QtWidgets import (
    QAbstractItemView, QCheckBox, QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFileDialog, QFormLayout,
    QHBoxLayout, QHeaderView, QLabel, QMessageBox, QPlainTextEdit, QPushButton, QSplitter, QStyledItemDelegate,
    QTableView, QVBoxLayout, QWidget,
)

from app.core.converters import DEFAULT_GAP_HOURS, SOURCES, guess_source, speakers_in
from app.core.data import Messages
from app.core.dataset_edit import FILTERS, EditorReport, analyse, save_chat_jsonl, token_lengths
from app.gui import settings
from app.gui.style import BAD, WARN
from app.gui.workers import Job, run_function

FETCH_BATCH = 500
ANALYSE_DELAY_MS = 400
"""Wait this long after the last edit before re-checking every row: typing should not start a scan per key."""
CELL_CHARS = 160
COLUMNS = ("#", "User", "Assistant", "Turns", "Tokens", "Check")
USER, ASSISTANT, TURNS, TOKENS, CHECK = 1, 2, 3, 4, 5
JSONL_FILTER = "Chat JSONL (*.jsonl);;All files (*)"
SOURCE_NAMES = {"whatsapp": "WhatsApp chat (.txt export)", "telegram": "Telegram Desktop (result.json)",
                "discord": "Discord (DiscordChatExporter JSON)", "transcript": "Transcript or script ('Name: line')"}


@dataclass(eq=False, slots=True)
class Row:
    """One example. Rows are objects, not indices, so undo finds the same row after other rows came and went."""

    messages: Messages
    """Never changed in place: an edit puts in a new list, so a check running on a snapshot reads a stable one."""
    length: int | None = None
    """Tokens as training renders it; None until counted."""
    removed: bool = False
    """Deleted (an undo can bring it back); lets stale check results skip it without a search."""


@dataclass(frozen=True)
class Check:
    """What a background check of a snapshot of the rows found, ready for the GUI thread to assign."""

    report: EditorReport
    lengths: list[int]
    notes: dict[int, str]
    """id(row) → what is wrong with it ('no assistant reply', 'duplicate of #12')."""
    filtered: dict[str, list[Row]]
    """Filter key → the rows it shows, in dataset order."""


def check_rows(snapshot: list[Row], tokenizer, system_prompt: str | None, max_len: int) -> Check:
    """Count what is uncounted, then find duplicates and problems. Runs on a worker thread: everything here is
    proportional to the number of rows, which is what must stay off the GUI thread."""
    conversations = [row.messages for row in snapshot]
    lengths = [row.length for row in snapshot]
    uncounted = [i for i, length in enumerate(lengths) if length is None]
    if uncounted and tokenizer is not None:
        for i, length in zip(uncounted, token_lengths(tokenizer, [conversations[i] for i in uncounted], system_prompt)):
            lengths[i] = length
    lengths = [length or 0 for length in lengths]
    report = analyse(conversations, lengths, max_len)
    notes = {id(snapshot[i]): "no assistant reply" for i in report.no_reply}
    notes.update({id(snapshot[i]): f"duplicate of #{original + 1}" for i, original in enumerate(report.duplicate_of)
                  if original is not None})
    filtered = {key: [snapshot[i] for i in report.rows_for(key)] for key in FILTERS if key != "all"}
    return Check(report, lengths, notes, filtered)


def freeze_heap() -> None:
    """Keep Python's full garbage collections short, so they do not stall the GUI.

    A full collection walks every tracked object while holding the GIL, whichever thread triggers it: with torch,
    transformers and 50,000 conversations loaded that is 0.1 to 0.3 s of a frozen window, measured by
    bench/dataset_editor_stall.py. `gc.freeze()` moves what exists now out of the collector's sight, so later
    collections only walk what was made since. Rows, notes and filter lists still free normally when replaced
    (reference counting), since nothing in them refers back to itself; only cyclic garbage made before a freeze
    would stay.
    """
    gc.freeze()


@contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection while a worker builds a dataset's worth of objects (parsed rows, editor rows).

    Such objects hold no cycles, so the collector finds nothing; but a full collection walks every object made
    since the last freeze while holding the GIL, and near the end of reading 50,000 rows one takes 40 to 130 ms, a
    stall of the window as long, measured by bench/dataset_editor_stall.py. Follow it with freeze_heap().
    """
    was_collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_collecting:
            gc.enable()


RELEASE_SLICE = 500
"""Rows freed at a time when a big dataset is replaced; each slice takes well under a millisecond."""


def release_in_background(rows: list) -> None:
    """Let a replaced dataset's rows go on a thread, a slice at a time.

    Freeing 50,000 rows in one go happens inside a single C call that holds the GIL throughout: the window froze
    ~0.1 s when a saved dataset was reloaded (bench/dataset_editor_stall.py). The slices are new lists, so a list
    someone else still holds is never changed; between two slices the GUI thread gets the GIL back.
    """
    slices = [rows[start:start + RELEASE_SLICE] for start in range(0, len(rows), RELEASE_SLICE)]

    def release() -> None:
        while slices:
            del slices[-1]

    if len(slices) > 1:
        threading.Thread(target=release, daemon=True, name="release-rows").start()


def make_rows(conversations: Sequence[Messages], lengths: Sequence[int | None] | None = None) -> list[Row]:
    """The editor's rows for a dataset. For 50,000 rows this takes 0.1 s or more, so a big dataset's rows are made on
    the worker that reads it, not on the GUI thread."""
    if lengths is None or len(lengths) != len(conversations):
        lengths = [None] * len(conversations)
    with collector_paused():
        return [Row(messages, length) for messages, length in zip(conversations, lengths)]


def first_text(messages: Messages, role: str) -> tuple[int | None, str]:
    """The position and text of the first turn of `role` (None, '' when there is none)."""
    return next(((i, m["content"]) for i, m in enumerate(messages) if m["role"] == role), (None, ""))


def one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= CELL_CHARS else flat[: CELL_CHARS - 1] + "…"


class ExamplesModel(QAbstractTableModel):
    """All rows (`rows`), the ones the current filter shows (`visible`), and how many of those Qt has fetched."""

    changed = Signal()
    """Any edit: rows added, removed or changed."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.rows: list[Row] = []
        self.visible: list[Row] = []
        self.showing_all = True
        self.fetched = 0
        self.notes: dict[int, str] = {}
        """id(row) → what the last check found wrong with it."""
        self.max_len = 512
        self.recount: Callable[[Messages], int] | None = None
        self._numbers: dict[int, int] | None = None
        self.undo_stack = QUndoStack(self)

    # Loading and filtering

    def set_examples(self, conversations: Sequence[Messages], lengths: Sequence[int | None] | None = None) -> None:
        self.set_rows(make_rows(conversations, lengths))

    def set_rows(self, rows: list[Row]) -> None:
        """Show these rows (from make_rows, which a worker can run for a big dataset): all of them, no undo history."""
        self.beginResetModel()
        replaced, self.rows = self.rows, rows
        self.visible, self.showing_all = self.rows, True
        self.fetched = min(FETCH_BATCH, len(self.visible))
        self.notes = {}
        self._numbers = None
        self.endResetModel()
        self.undo_stack.clear()
        release_in_background(replaced)
        freeze_heap()

    def show_only(self, rows: list[Row] | None) -> None:
        """Show these rows (in dataset order), or all of them for None."""
        self.beginResetModel()
        self.showing_all = rows is None
        self.visible = self.rows if rows is None else rows
        self.fetched = min(FETCH_BATCH, len(self.visible))
        self.endResetModel()

    def conversations(self) -> list[Messages]:
        return [row.messages for row in self.rows]

    # Qt's model interface

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else self.fetched

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(COLUMNS)

    def canFetchMore(self, parent=QModelIndex()) -> bool:
        return not parent.isValid() and self.fetched < len(self.visible)

    def fetchMore(self, parent=QModelIndex()) -> None:
        more = min(FETCH_BATCH, len(self.visible) - self.fetched)
        if more <= 0:
            return
        self.beginInsertRows(QModelIndex(), self.fetched, self.fetched + more - 1)
        self.fetched += more
        self.endInsertRows()

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        return None

    def flags(self, index: QModelIndex):
        base = super().flags(index)
        return base | Qt.ItemFlag.ItemIsEditable if index.column() in (USER, ASSISTANT) else base

    def row_at(self, index: QModelIndex) -> Row:
        return self.visible[index.row()]

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= self.fetched:
            return None
        row, column = self.visible[index.row()], index.column()
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole, Qt.ItemDataRole.ToolTipRole):
            if column == 0:
                if role != Qt.ItemDataRole.DisplayRole:
                    return None
                return str(index.row() + 1 if self.showing_all else self.number_of(row))
            if column in (USER, ASSISTANT):
                text = first_text(row.messages, "user" if column == USER else "assistant")[1]
                return one_line(text) if role == Qt.ItemDataRole.DisplayRole else text
            if column == TURNS:
                return str(len(row.messages))
            if column == TOKENS:
                return "…" if row.length is None else f"{row.length:,}"
            if column == CHECK:
                return self.notes.get(id(row), "")
        if role == Qt.ItemDataRole.ForegroundRole:
            if column == TOKENS and row.length is not None and row.length > self.max_len:
                return QColor(WARN)
            if column == CHECK and id(row) in self.notes:
                return QColor(BAD)
        if role == Qt.ItemDataRole.TextAlignmentRole and column in (0, TURNS, TOKENS):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def setData(self, index: QModelIndex, value: Any, role=Qt.ItemDataRole.EditRole) -> bool:
        if role != Qt.ItemDataRole.EditRole or index.column() not in (USER, ASSISTANT):
            return False
        row = self.visible[index.row()]
        role_name = "user" if index.column() == USER else "assistant"
        position, old = first_text(row.messages, role_name)
        if position is None:
            if not str(value).strip():
                return False
            self.undo_stack.push(AddTurn(self, row, role_name, str(value)))
        elif str(value) != old:
            self.undo_stack.push(EditTurn(self, row, position, str(value)))
        return True

    # Changes (called by the undo commands, which alone change rows)

    def set_turn(self, row: Row, position: int, text: str) -> None:
        messages = [dict(message) for message in row.messages]  # a new list: analysis snapshots keep the old one
        messages[position]["content"] = text
        self._replace(row, messages)

    def set_messages(self, row: Row, messages: Messages) -> None:
        self._replace(row, messages)

    def _replace(self, row: Row, messages: Messages) -> None:
        row.messages = messages
        row.length = self.recount(messages) if self.recount else None
        self.notes.pop(id(row), None)
        if row in self.visible[: self.fetched]:
            at = self.visible.index(row)
            self.dataChanged.emit(self.index(at, 0), self.index(at, len(COLUMNS) - 1))
        self.changed.emit()

    def insert(self, positions: list[tuple[int, Row]]) -> None:
        """Put rows back at their positions in `rows` (ascending), showing them whatever the filter."""
        for _, row in positions:
            row.removed = False
            if row.length is None and self.recount:
                row.length = self.recount(row.messages)
        if len(positions) == 1:
            (position, row), = positions
            self.rows.insert(position, row)
            self._numbers = None
            at = position if self.showing_all else self._visible_position(row)
            if at <= self.fetched:
                self.beginInsertRows(QModelIndex(), at, at)
                if not self.showing_all:
                    self.visible.insert(at, row)
                self.fetched += 1
                self.endInsertRows()
            elif not self.showing_all:
                self.visible.insert(at, row)
        else:  # many rows at once (undoing a bulk delete): one merge and one reset, not a shift and a signal per row
            self.beginResetModel()
            merged, existing, coming = [], iter(self.rows), iter(positions)
            upcoming = next(coming, None)
            for final_position in range(len(self.rows) + len(positions)):
                if upcoming is not None and upcoming[0] == final_position:
                    merged.append(upcoming[1])
                    upcoming = next(coming, None)
                else:
                    merged.append(next(existing))
            back = {id(row) for _, row in positions}
            if not self.showing_all:
                shown = {id(row) for row in self.visible} | back
                self.visible = [row for row in merged if id(row) in shown]
            self.rows = merged
            if self.showing_all:
                self.visible = merged
            self._numbers = None
            self.fetched = min(len(self.visible), self.fetched + len(positions))
            self.endResetModel()
        self.changed.emit()

    def remove(self, rows: list[Row]) -> list[tuple[int, Row]]:
        """Take rows out; returns their (position, row) pairs, ascending, for putting them back."""
        for row in rows:
            row.removed = True
        positions = [(i, row) for i, row in enumerate(self.rows) if row.removed]
        if len(rows) == 1 and rows[0] in self.visible[: self.fetched]:
            at = self.visible.index(rows[0])
            self.beginRemoveRows(QModelIndex(), at, at)
            del self.rows[positions[0][0]]
            if not self.showing_all:
                del self.visible[at]
            self.fetched -= 1
            self._numbers = None
            self.endRemoveRows()
        else:
            self.beginResetModel()
            self.fetched -= sum(1 for row in self.visible[: self.fetched] if row.removed)
            self.rows = [row for row in self.rows if not row.removed]
            self.visible = self.rows if self.showing_all else [row for row in self.visible if not row.removed]
            self._numbers = None
            self.endResetModel()
        self.changed.emit()
        return positions

    def _order(self) -> dict[int, int]:
        """id(row) → its 0-based position in the dataset, rebuilt only after rows came or went."""
        if self._numbers is None:
            self._numbers = {id(row): i for i, row in enumerate(self.rows)}
        return self._numbers

    def number_of(self, row: Row) -> int:
        """The row's 1-based position in the whole dataset (what the '#' column and the notes cite)."""
        return self._order()[id(row)] + 1

    def _visible_position(self, row: Row) -> int:
        """Where a row goes among the visible ones: after the visible rows that come before it in the dataset."""
        order = self._order()
        mine = order[id(row)]
        return sum(1 for candidate in self.visible if order.get(id(candidate), -1) < mine)

    def apply_notes(self, notes: dict[int, str]) -> None:
        self.notes = notes
        if self.fetched:
            self.dataChanged.emit(self.index(0, CHECK), self.index(self.fetched - 1, CHECK))


class EditTurn(QUndoCommand):
    def __init__(self, model: ExamplesModel, row: Row, position: int, text: str):
        super().__init__(f"Edit turn {position + 1}")
        self.model, self.row, self.position = model, row, position
        self.old, self.new = row.messages[position]["content"], text

    def redo(self) -> None:
        self.model.set_turn(self.row, self.position, self.new)

    def undo(self) -> None:
        self.model.set_turn(self.row, self.position, self.old)


class AddTurn(QUndoCommand):
    """An example had no turn of this role (a prompt with no reply): give it one."""

    def __init__(self, model: ExamplesModel, row: Row, role: str, text: str):
        super().__init__(f"Add a {role} turn")
        self.model, self.row = model, row
        self.old, self.new = row.messages, row.messages + [{"role": role, "content": text}]

    def redo(self) -> None:
        self.model.set_messages(self.row, self.new)

    def undo(self) -> None:
        self.model.set_messages(self.row, self.old)


class DeleteExamples(QUndoCommand):
    def __init__(self, model: ExamplesModel, rows: list[Row]):
        super().__init__(f"Delete {len(rows)} example(s)")
        self.model, self.rows = model, rows
        self.positions: list[tuple[int, Row]] = []

    def redo(self) -> None:
        self.positions = self.model.remove(self.rows)

    def undo(self) -> None:
        self.model.insert(self.positions)


class AddExample(QUndoCommand):
    def __init__(self, model: ExamplesModel, row: Row, position: int):
        super().__init__("Add an example")
        self.model, self.row, self.position = model, row, position

    def redo(self) -> None:
        self.model.insert([(self.position, self.row)])

    def undo(self) -> None:
        self.model.remove([self.row])


class MultiLineDelegate(QStyledItemDelegate):
    """Turns hold paragraphs: edit them in a text box that keeps line breaks (Ctrl+Enter or leaving it commits)."""

    def createEditor(self, parent, option, index):
        editor = QPlainTextEdit(parent)
        editor.setMinimumHeight(90)
        return editor

    def setEditorData(self, editor, index) -> None:
        editor.setPlainText(index.data(Qt.ItemDataRole.EditRole) or "")

    def setModelData(self, editor, model, index) -> None:
        model.setData(index, editor.toPlainText(), Qt.ItemDataRole.EditRole)

    def updateEditorGeometry(self, editor, option, index) -> None:
        rect = option.rect
        rect.setHeight(max(rect.height(), 90))
        editor.setGeometry(rect)


class TurnsModel(QAbstractTableModel):
    """Every turn of the selected example, each editable; edits go through the examples' undo stack."""

    def __init__(self, examples: ExamplesModel, parent=None):
        super().__init__(parent)
        self.examples = examples
        self.row: Row | None = None

    def show_row(self, row: Row | None) -> None:
        self.beginResetModel()
        self.row = row
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() or self.row is None else len(self.row.messages)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 2

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return ("Role", "Text")[section]
        return None

    def flags(self, index):
        base = super().flags(index)
        return base | Qt.ItemFlag.ItemIsEditable if index.column() == 1 else base

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if self.row is None or not index.isValid() or index.row() >= len(self.row.messages):
            return None
        message = self.row.messages[index.row()]
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            return message["role"] if index.column() == 0 else message["content"]
        return None

    def setData(self, index, value, role=Qt.ItemDataRole.EditRole) -> bool:
        if self.row is None or role != Qt.ItemDataRole.EditRole or index.column() != 1:
            return False
        if str(value) != self.row.messages[index.row()]["content"]:
            self.examples.undo_stack.push(EditTurn(self.examples, self.row, index.row(), str(value)))
        return True

    def refresh(self) -> None:
        self.beginResetModel()
        self.endResetModel()


class DatasetEditor(QWidget):
    """Toolbar (filter, add, delete, undo, redo, save as), the examples table and the selected example's turns."""

    analysis_ready = Signal(object)
    """An EditorReport for the rows as they are now (histogram, summary and warnings follow it)."""
    selection_changed = Signal(object)
    """The selected example's messages (or None): the masking preview shows it."""
    saved = Signal(str)
    failed = Signal(object)
    """A Failure from a background job (the check, or Save as…)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = ExamplesModel(self)
        self.turns = TurnsModel(self.model, self)
        self.report: EditorReport | None = None
        self.dirty = False
        """Edited (or converted) since it was loaded or saved: training would not see these rows yet."""
        self._analysis: Job | None = None
        self._analyse_again = False
        self._filtered: dict[str, list[Row]] = {}
        self._save_job: Job | None = None
        self._tokenizer = None
        self._system_prompt: str | None = None

        self.filter = QComboBox()
        for key, caption in FILTERS.items():
            self.filter.addItem(caption, key)
        self.filter.setToolTip("Show only the examples with a problem, to fix or delete them.")
        self.add_button = QPushButton("Add example")
        self.delete_button = QPushButton("Delete")
        self.delete_button.setShortcut(QKeySequence.StandardKey.Delete)
        self.dedupe_button = QPushButton("Remove duplicates")
        self.dedupe_button.setToolTip("Delete every example that repeats an earlier one, exactly or nearly (undoable).")
        self.undo_button = QPushButton("Undo")
        self.redo_button = QPushButton("Redo")
        self.save_button = QPushButton("Save as…")
        self.save_button.setToolTip("Write the examples as they are now to a chat JSONL file (the original stays as it was).")
        self.count = QLabel()
        self.count.setObjectName("muted")

        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.DoubleClicked | QAbstractItemView.EditTrigger.EditKeyPressed)
        self.table.setItemDelegate(MultiLineDelegate(self.table))
        self.table.setWordWrap(False)
        self.table.setAcceptDrops(False)
        self.table.verticalHeader().hide()
        # Fixed row height: Qt then never measures rows, which is what keeps 50,000 of them cheap.
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
        self.table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        for column, width in ((0, 48), (TURNS, 48), (TOKENS, 60), (CHECK, 130)):
            self.table.setColumnWidth(column, width)
        header.setSectionResizeMode(USER, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(ASSISTANT, QHeaderView.ResizeMode.Stretch)
        self.turns_view = QTableView()
        self.turns_view.setModel(self.turns)
        self.turns_view.setItemDelegate(MultiLineDelegate(self.turns_view))
        self.turns_view.setWordWrap(True)
        self.turns_view.verticalHeader().hide()
        self.turns_view.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.turns_view.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.turns_view.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.turns_view.setEditTriggers(QAbstractItemView.EditTrigger.DoubleClicked | QAbstractItemView.EditTrigger.EditKeyPressed)
        self.turns_view.setAcceptDrops(False)

        bar = QHBoxLayout()
        bar.setContentsMargins(0, 0, 0, 0)
        bar.addWidget(self.filter)
        bar.addWidget(self.count, 1)
        for button in (self.add_button, self.delete_button, self.dedupe_button, self.undo_button, self.redo_button,
                       self.save_button):
            bar.addWidget(button)
        turns_caption = QLabel("Turns of the selected example (double-click a text to edit it)")
        turns_caption.setObjectName("muted")
        turns_box = QWidget()
        turns_layout = QVBoxLayout(turns_box)
        turns_layout.setContentsMargins(0, 0, 0, 0)
        turns_layout.addWidget(turns_caption)
        turns_layout.addWidget(self.turns_view, 1)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(turns_box)
        split.setSizes([190, 230])  # the turns of the selected example deserve room to read
        split.setChildrenCollapsible(False)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(bar)
        layout.addWidget(split, 1)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(ANALYSE_DELAY_MS)
        self._timer.timeout.connect(self._analyse)
        self.filter.currentIndexChanged.connect(self._apply_filter)
        self.add_button.clicked.connect(self.add_example)
        self.delete_button.clicked.connect(self.delete_selected)
        self.dedupe_button.clicked.connect(self.remove_duplicates)
        self.undo_button.clicked.connect(self.model.undo_stack.undo)
        self.redo_button.clicked.connect(self.model.undo_stack.redo)
        self.model.undo_stack.canUndoChanged.connect(self.undo_button.setEnabled)
        self.model.undo_stack.canRedoChanged.connect(self.redo_button.setEnabled)
        self.save_button.clicked.connect(self._save_as)
        self.model.changed.connect(self._edited)
        self.model.modelReset.connect(self._selection_moved)
        self.table.selectionModel().currentRowChanged.connect(self._selection_moved)
        self._update_buttons()

    # Loading

    def set_examples(self, conversations: Sequence[Messages], lengths: Sequence[int] | None, max_len: int,
                     tokenizer, system_prompt: str | None, dirty: bool = False) -> None:
        """Show a dataset; `dirty` when it exists only here so far (a conversion not saved yet)."""
        self.show_rows(make_rows(conversations, lengths), max_len, tokenizer, system_prompt, dirty)

    def show_rows(self, rows: list[Row], max_len: int, tokenizer, system_prompt: str | None, dirty: bool = False) -> None:
        """set_examples with the rows made already (make_rows, on the worker that read a big dataset)."""
        self._tokenizer, self._system_prompt = tokenizer, system_prompt
        self.model.max_len = max_len
        self.model.recount = self._count_tokens if tokenizer is not None else None
        self.filter.blockSignals(True)
        self.filter.setCurrentIndex(0)
        self.filter.blockSignals(False)
        self.model.set_rows(rows)
        self.dirty = dirty
        self.report = None
        self._update_buttons()
        if self.model.rows:
            self.table.selectRow(0)
        self._analyse_soon()

    def clear(self) -> None:
        self.model.set_examples([])
        self.turns.show_row(None)
        self.report = None
        self.dirty = False
        self._update_buttons()

    def set_max_len(self, max_len: int) -> None:
        self.model.max_len = max_len
        self._analyse_soon()

    def _count_tokens(self, messages: Messages) -> int:
        return token_lengths(self._tokenizer, [messages], self._system_prompt)[0]

    # Editing

    def selected_rows(self) -> list[Row]:
        return [self.model.row_at(index) for index in self.table.selectionModel().selectedRows()]

    def delete_selected(self) -> None:
        rows = self.selected_rows()
        if rows:
            self.model.undo_stack.push(DeleteExamples(self.model, rows))

    def remove_duplicates(self) -> None:
        """Delete the rows the last check found repeating an earlier one (one undo step brings them all back)."""
        if self.report is None:
            return
        # A row edited since the check lost its note: it may not repeat anything any more, so it stays.
        rows = [row for row in self._filtered.get("duplicates", []) if not row.removed and id(row) in self.model.notes]
        if rows:
            self.model.undo_stack.push(DeleteExamples(self.model, rows))

    def add_example(self) -> None:
        """A new empty user/assistant pair after the selection (or at the end), selected and ready to type into."""
        selected = self.selected_rows()
        position = self.model.number_of(selected[-1]) if selected else len(self.model.rows)
        row = Row([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])
        self.model.undo_stack.push(AddExample(self.model, row, position))
        at = self.model.visible.index(row)
        while at >= self.model.fetched and self.model.canFetchMore():
            self.model.fetchMore()
        self.table.selectRow(at)
        self.table.scrollTo(self.model.index(at, USER))

    def _edited(self) -> None:
        self.dirty = True
        self._update_buttons()
        self._selection_moved()
        self._analyse_soon()

    def _apply_filter(self) -> None:
        key = self.filter.currentData()
        if key == "all" or self.report is None:
            self.model.show_only(None)
        else:
            self.model.show_only([row for row in self._filtered.get(key, []) if not row.removed])
        self._update_buttons()

    def _selection_moved(self, *_) -> None:
        current = self.table.selectionModel().currentIndex()
        row = self.model.row_at(current) if current.isValid() and current.row() < self.model.fetched else None
        self.turns.show_row(row)
        self.selection_changed.emit(row.messages if row else None)

    def _update_buttons(self) -> None:
        total, shown = len(self.model.rows), len(self.model.visible)
        self.count.setText(f"{total:,} examples" if shown == total else f"{shown:,} of {total:,} examples")
        self.delete_button.setEnabled(shown > 0)
        self.undo_button.setEnabled(self.model.undo_stack.canUndo())
        self.redo_button.setEnabled(self.model.undo_stack.canRedo())
        self.save_button.setEnabled(total > 0)
        self.dedupe_button.setEnabled(bool(self.report and self.report.duplicates))

    # Checking every row, off the GUI thread

    def _analyse_soon(self) -> None:
        self._timer.start()

    def _analyse(self) -> None:
        if self._analysis is not None:
            self._analyse_again = True  # one scan at a time; the latest edits get the next one
            return
        snapshot = list(self.model.rows)
        tokenizer, system_prompt, max_len = self._tokenizer, self._system_prompt, self.model.max_len

        def work(report) -> Check:
            check = check_rows(snapshot, tokenizer, system_prompt, max_len)
            for row, length in zip(snapshot, check.lengths):
                if row.length is None:  # counted here; a row edited meanwhile was recounted by the edit
                    row.length = length
            return check

        self._analysis = run_function(work)
        self._analysis.succeeded.connect(self._checked)
        self._analysis.failed.connect(self.failed)
        self._analysis.finished.connect(self._analysis_ended)

    def _checked(self, check: Check) -> None:
        """Only assignments and a repaint of the visible cells: the GUI thread never walks all the rows."""
        self.report = check.report
        self._filtered = check.filtered
        freeze_heap()  # the check's results live until the next one: out of the collector's way
        self.model.apply_notes(check.notes)
        if self.filter.currentData() != "all":
            self._apply_filter()
        self._update_buttons()
        self.analysis_ready.emit(check.report)

    def _analysis_ended(self) -> None:
        self._analysis = None
        if self._analyse_again:
            self._analyse_again = False
            self._analyse()

    def lengths(self) -> list[int]:
        """Token counts as of the last check (the histogram's data); rows edited since are recounted with the next."""
        return self.report.lengths if self.report is not None else []

    @property
    def is_busy(self) -> bool:
        return self._analysis is not None or self._timer.isActive() or self._save_job is not None

    # Saving

    def _save_as(self) -> None:
        path = self.choose_save_path()
        if path:
            self.save_to(path)

    def choose_save_path(self) -> str | None:
        """Ask where to save (a .jsonl); None when the user cancels."""
        path, _ = QFileDialog.getSaveFileName(self, "Save the dataset as", settings.last_folder(), JSONL_FILTER)
        if not path:
            return None
        if not path.endswith(".jsonl"):
            path += ".jsonl"
        settings.remember_folder_of(path)
        return path

    def save_to(self, path: str) -> Job:
        """Write the rows as they are now, on a worker thread (atomically: a failure leaves any old file whole)."""
        conversations = self.model.conversations()
        self._save_job = run_function(lambda report: str(save_chat_jsonl(path, conversations)))
        self._save_job.succeeded.connect(self._saved)
        self._save_job.failed.connect(self.failed)
        self._save_job.finished.connect(lambda: setattr(self, "_save_job", None))
        return self._save_job

    def ask_about_unsaved_edits(self, change: str) -> QMessageBox.StandardButton:
        """Save, Discard or Cancel, as a text editor asks before `change` ('Opening chats.csv') replaces the edits."""
        buttons = QMessageBox.StandardButton
        box = QMessageBox(QMessageBox.Icon.Question, "Unsaved changes", "Save your changes to the examples first?",
                          buttons.Save | buttons.Discard | buttons.Cancel, self)
        box.setInformativeText(f"The {len(self.model.rows):,} examples here have changes that are not in any file "
                               f"yet. {change} would replace them.")
        box.button(buttons.Save).setText("Save as…")  # it asks for a file: the original stays as it was
        box.setDefaultButton(buttons.Save)
        return buttons(box.exec())

    def _saved(self, path: str) -> None:
        self.dirty = False
        self.model.undo_stack.setClean()
        self.saved.emit(path)


class ConvertDialog(QDialog):
    """Pick a chat export (or transcript/script), its kind, and who the persona is; the page then converts it.

    Reading who speaks runs on a worker thread: a few years of WhatsApp history is megabytes of text.
    """

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        from app.gui.wizard.widgets import PathField  # here, not at the top: the wizard package imports this module

        self.setWindowTitle("Make a dataset from a chat")
        self.path_field = PathField("A WhatsApp .txt, Telegram result.json, Discord JSON or a transcript…", self._browse)
        self.source = QComboBox()
        for key in SOURCES:
            self.source.addItem(SOURCE_NAMES[key], key)
        self.persona = QComboBox(editable=True)
        self.persona.setToolTip("Whose messages the persona learns to write; the list shows who speaks, most active first.")
        self.gap = QDoubleSpinBox(minimum=0.1, maximum=24 * 30, value=DEFAULT_GAP_HOURS, decimals=1, suffix=" h")
        self.gap.setToolTip("A silence this long starts a new conversation (each conversation is one example).")
        self.anonymise = QCheckBox("Replace the other people's names and phone numbers with placeholders")
        self.anonymise.setChecked(True)
        self.status = QLabel()
        self.status.setObjectName("muted")
        self.status.setWordWrap(True)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Convert")
        form = QFormLayout(self)
        form.addRow("Export file", self.path_field)
        form.addRow("Kind", self.source)
        form.addRow("Persona", self.persona)
        form.addRow("New conversation after", self.gap)
        form.addRow("", self.anonymise)
        form.addRow(self.status)
        form.addRow(self.buttons)
        self.resize(620, self.sizeHint().height())
        self._job: Job | None = None
        self.path_field.edit.editingFinished.connect(self._file_chosen)
        self.source.activated.connect(self._read_speakers)
        self.buttons.accepted.connect(self._accept)
        self.buttons.rejected.connect(self.reject)

    def _browse(self) -> str:
        return QFileDialog.getOpenFileName(self, "Choose a chat export", settings.last_folder(),
                                           "Chat exports (*.txt *.json);;All files (*)")[0]

    def choose(self, path: str, source: str | None = None) -> None:
        self.path_field.edit.setText(path)
        self._file_chosen(source)

    def _file_chosen(self, source: str | None = None) -> None:
        path = self.path_field.text()
        if not path or not Path(path).is_file():
            return
        try:
            guessed = source or guess_source(path)
        except OSError as exc:
            self.status.setText(f"Cannot read {Path(path).name}: {exc}")
            return
        self.source.setCurrentIndex(self.source.findData(guessed))
        self._read_speakers()

    def _read_speakers(self) -> None:
        path, source = self.path_field.text(), self.source.currentData()
        if not path:
            return
        self.status.setText(f"Reading who speaks in {Path(path).name}…")
        self._job = run_function(lambda report: speakers_in(path, source))
        self._job.succeeded.connect(self._speakers_read)
        self._job.failed.connect(lambda failure: self.status.setText(
            failure.message + (f"\n{failure.hint}" if failure.hint else "")))
        self._job.finished.connect(lambda: setattr(self, "_job", None))

    def _speakers_read(self, speakers) -> None:
        typed = self.persona.currentText()
        self.persona.clear()
        for name, count in speakers.most_common(200):
            self.persona.addItem(f"{name}", name)
            self.persona.setItemData(self.persona.count() - 1, f"{count:,} messages", Qt.ItemDataRole.ToolTipRole)
        # Usually the person exporting is one of the two most active; the user picks which.
        self.persona.setCurrentText(typed if typed and typed in speakers else "")
        self.status.setText(f"{len(speakers):,} people speak: " + ", ".join(
            f"{name} ({count:,})" for name, count in speakers.most_common(6)) + (" …" if len(speakers) > 6 else ""))

    def _accept(self) -> None:
        if not self.path_field.text() or not self.persona.currentText().strip():
            self.status.setText("Choose the export file and the persona (whose replies to learn).")
            return
        self.accept()

    def request(self) -> dict:
        return {"path": self.path_field.text(), "source": self.source.currentData(),
                "persona": self.persona.currentText().strip(), "gap_hours": self.gap.value(),
                "anonymise": self.anonymise.isChecked()}

    def done(self, result: int) -> None:
        if self._job is not None:
            self._job.wait(5000)  # a thread must not outlive the dialog's signals
        super().done(result)
