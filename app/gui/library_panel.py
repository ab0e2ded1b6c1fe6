"""The adapter library: every adapter on disk with its manifest, whether it fits the chat's base, and what to do
with it (open in chat, rename, delete to the trash, open its folder, add one made elsewhere).

Everything here reads files only (no torch), so it runs on the GUI thread; the folder is watched, so adapters that
training, a mix, an import or another process writes appear without a manual refresh.
"""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import QFileSystemWatcher, QObject, QSortFilterProxyModel, Qt, QTimer, QUrl, Signal, Slot
from PySide6.QtGui import QBrush, QColor, QDesktopServices, QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QAbstractItemView, QFileDialog, QFormLayout, QHBoxLayout, QHeaderView, QInputDialog, QLabel, QLineEdit,
    QMessageBox, QPlainTextEdit, QPushButton, QSplitter, QStyle, QTableView, QTreeWidget, QTreeWidgetItem, QVBoxLayout,
    QWidget,
)

from app.core.adalora import RankAllocation, read_rank_allocation
from app.core.errors import TailorError
from app.core.evaluation import saved_report_card
from app.core.library import AdapterEntry, BaseProfile, Library, add_peft_folder, adapter_fit, human_size
from app.gui.chat_worker import loaded_base
from app.gui.report_card import open_report_card
from app.gui.style import ACCENT, BAD, GOOD, WARN
from app.gui.training_panel import EVAL_COLOUR, SmoothedSeries
from app.gui.wizard.base import Banner
from app.gui.wizard.widgets import LazyPlots, static_plot
from app.gui.workers import Job, run_function

COLUMNS = ("Fit", "Persona", "Kind", "Base model", "Rank", "Size", "Created", "Final loss", "Rows", "Report card", "Status")
FIT, NAME = 0, 1
SORT_ROLE = Qt.ItemDataRole.UserRole + 1
# Rewrites of one adapter (training publishes, a copy lands) fire several change events; one refresh is enough.
WATCH_DEBOUNCE_MS = 250


class LibraryWatcher(QObject):
    """Says `changed` (once per burst) when adapters appear, disappear or change in the library on disk."""

    changed = Signal()

    def __init__(self, library: Library, parent: QObject | None = None):
        super().__init__(parent)
        self.library = library
        self._watcher = QFileSystemWatcher(self)
        self._timer = QTimer(self, singleShot=True, interval=WATCH_DEBOUNCE_MS)
        self._timer.timeout.connect(self._fire)
        self._watcher.directoryChanged.connect(self._timer.start)
        self._watcher.fileChanged.connect(self._timer.start)
        self._rewatch()

    def _fire(self) -> None:
        self._rewatch()
        self.changed.emit()

    def _rewatch(self) -> None:
        """Watch the adapters folder and each adapter in it (a half-written one is repaired in place), or the library
        root while there is no adapters folder yet."""
        wanted = {str(self.library.root)} if self.library.root.is_dir() else set()
        if self.library.adapters_dir.is_dir():
            wanted.add(str(self.library.adapters_dir))
            wanted.update(str(path) for path in self.library.adapters_dir.iterdir() if path.is_dir())
        watched = set(self._watcher.directories())
        if watched - wanted:
            self._watcher.removePaths(sorted(watched - wanted))
        if wanted - watched:
            self._watcher.addPaths(sorted(wanted - watched))


def fit_text(entry: AdapterEntry, base: BaseProfile | None) -> tuple[str, str | None]:
    """('fits' | 'no' | 'damaged' | 'unknown', the reason to show)."""
    if entry.problem:
        return "damaged", entry.problem
    if base is None:
        return "unknown", "Open a persona in Chat to load a base model; fit is checked against the loaded base."
    reason = adapter_fit(entry, base)
    return ("no", f"Does not fit {base.model_id}: {reason}") if reason else ("fits", f"Fits {base.model_id}")


class LibraryPanel(QWidget):
    open_in_chat = Signal(str)
    """The user wants to talk to this adapter (its name)."""

    def __init__(self, library: Library, parent: QWidget | None = None):
        super().__init__(parent)
        self.library = library
        self.base: BaseProfile | None = loaded_base().profile
        self.entries: dict[str, AdapterEntry] = {}
        self.import_job: Job | None = None

        title = QLabel("Adapter library")
        title.setObjectName("pageTitle")
        self.location = QLabel(str(library.root))
        self.location.setObjectName("muted")
        self.location.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.filter_edit = QLineEdit(placeholderText="Filter by name, base model, kind…", clearButtonEnabled=True)
        self.filter_edit.setMinimumWidth(240)
        self.add_button = QPushButton("Add PEFT folder…")
        self.add_button.setToolTip("Copy a LoRA adapter folder made with another tool (adapter_config.json + "
                                   "adapter_model.safetensors) into the library.")
        self.import_button = QPushButton("Import bundle…")
        self.import_button.setToolTip("Add a .tailor bundle (or a zip of a PEFT folder) someone shared; it is checked "
                                      "against its base model before it is added.")
        self.trash_button = QPushButton()
        self.banner = Banner()

        self.model = QStandardItemModel(0, len(COLUMNS), self)
        self.model.setHorizontalHeaderLabels(COLUMNS)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.proxy.setFilterKeyColumn(-1)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(NAME, Qt.SortOrder.AscendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.ResizeMode.Stretch)
        self.empty_label = QLabel("No adapters yet. Train one on the Train tab, or add a PEFT folder.")
        self.empty_label.setObjectName("muted")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)

        self.chat_button = QPushButton("Open in chat")
        self.chat_button.setObjectName("primary")
        self.rename_button = QPushButton("Rename…")
        self.delete_button = QPushButton("Delete…")
        self.folder_button = QPushButton("Open folder")
        self.export_button = QPushButton("Export…")
        self.card_button = QPushButton("Report card")
        self.card_button.setToolTip("How this persona compares with its base: style, loops, knowledge and held-out "
                                    "loss on questions it did not learn from.")
        self.details = AdapterDetails()
        self.details.setMinimumWidth(360)

        top = QHBoxLayout()
        top.addWidget(title)
        top.addWidget(self.location, 1)
        top.addWidget(self.filter_edit)
        top.addWidget(self.add_button)
        top.addWidget(self.import_button)
        top.addWidget(self.trash_button)
        actions = QHBoxLayout()
        for button in (self.chat_button, self.rename_button, self.delete_button, self.folder_button, self.export_button,
                       self.card_button):
            actions.addWidget(button)
        actions.addStretch(1)
        table_side = QWidget()
        table_layout = QVBoxLayout(table_side)
        table_layout.setContentsMargins(0, 0, 0, 0)
        table_layout.addWidget(self.table, 1)
        table_layout.addWidget(self.empty_label)
        table_layout.addLayout(actions)
        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(table_side)
        splitter.addWidget(self.details)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        splitter.setSizes([870, 400])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.addLayout(top)
        layout.addWidget(self.banner)
        layout.addWidget(splitter, 1)

        self.filter_edit.textChanged.connect(self.proxy.setFilterFixedString)
        self.table.selectionModel().selectionChanged.connect(self._selection_changed)
        self.table.doubleClicked.connect(self._open_selected_in_chat)
        self.chat_button.clicked.connect(self._open_selected_in_chat)
        self.rename_button.clicked.connect(self._rename_selected)
        self.delete_button.clicked.connect(self._delete_selected)
        self.folder_button.clicked.connect(self._open_selected_folder)
        self.add_button.clicked.connect(self._add_peft_folder)
        self.import_button.clicked.connect(self._import_bundle)
        self.export_button.clicked.connect(self._export_selected)
        self.card_button.clicked.connect(self._open_report_card)
        self.trash_button.clicked.connect(self._empty_trash)
        self.watcher = LibraryWatcher(library, self)
        self.watcher.changed.connect(self.refresh)
        loaded_base().changed.connect(self.set_base)
        self.refresh()

    # Reading

    @Slot()
    def refresh(self) -> None:
        """Read the library from disk again, keeping the selection, sort order and filter."""
        selected = self.selected_name()
        self.entries = {entry.name: entry for entry in self.library.entries()}
        self.model.removeRows(0, self.model.rowCount())
        for entry in self.entries.values():
            self.model.appendRow(self._row(entry))
        self.empty_label.setVisible(not self.entries)
        trash = len(self.library.trash_entries())
        self.trash_button.setText(f"Empty trash ({trash})")
        self.trash_button.setEnabled(trash > 0)
        self.select(selected)
        self._selection_changed()

    @Slot(object)
    def set_base(self, base: BaseProfile | None) -> None:
        """Judge every adapter against this base (the one the chat has loaded)."""
        self.base = base
        self.refresh()

    def selected_name(self) -> str | None:
        rows = self.table.selectionModel().selectedRows(NAME)
        return self.proxy.data(rows[0]) if rows else None

    def select(self, name: str | None) -> None:
        for row in range(self.proxy.rowCount()):
            if self.proxy.data(self.proxy.index(row, NAME)) == name:
                self.table.selectRow(row)
                return
        self.table.clearSelection()

    def _row(self, entry: AdapterEntry) -> list[QStandardItem]:
        fit, reason = fit_text(entry, self.base)
        icon = {"fits": QStyle.StandardPixmap.SP_DialogApplyButton, "no": QStyle.StandardPixmap.SP_MessageBoxWarning,
                "damaged": QStyle.StandardPixmap.SP_MessageBoxCritical,
                "unknown": QStyle.StandardPixmap.SP_MessageBoxQuestion}[fit]
        status = "ok" if entry.ok else f"damaged: {entry.problem}"
        card = saved_report_card(entry)
        card_summary = card.summary() if card else "—"
        values = [
            (fit, fit), (entry.name, entry.name.lower()), (entry.kind, entry.kind),
            # The hub organisation is in the tooltip; the model's own name is what tells bases apart at a glance.
            ((entry.base_model_id or "?").rsplit("/", 1)[-1], entry.base_model_id or ""), (str(entry.rank or "?"), entry.rank or 0),
            (human_size(entry.size_bytes), entry.size_bytes), (entry.created or "—", entry.created or ""),
            (f"{entry.final_loss:.3f}" if entry.final_loss is not None else "—",
             entry.final_loss if entry.final_loss is not None else float("inf")),
            (str(entry.dataset_rows) if entry.dataset_rows else "—", entry.dataset_rows or 0),
            (card_summary, card.style().hits if card and card.style() else -1), (status, status),
        ]
        items = []
        for text, sort_key in values:
            item = QStandardItem(text)
            item.setData(sort_key, SORT_ROLE)
            item.setToolTip(text)
            items.append(item)
        items[COLUMNS.index("Base model")].setToolTip(entry.base_model_id or "unknown")
        items[FIT].setText("")
        items[FIT].setIcon(self.style().standardIcon(icon))
        items[FIT].setToolTip(reason or "")
        if fit in ("no", "damaged"):
            items[-1].setText(status if fit == "damaged" else reason)
            items[-1].setToolTip(items[-1].text())
            items[-1].setForeground(QBrush(QColor(BAD if fit == "damaged" else WARN)))
        return items

    @Slot()
    def _selection_changed(self, *_) -> None:
        entry = self.entries.get(self.selected_name() or "")
        for button in (self.rename_button, self.delete_button, self.folder_button):
            button.setEnabled(entry is not None)
        for button in (self.chat_button, self.export_button, self.card_button):
            button.setEnabled(entry is not None and entry.ok)
        self.details.show_entry(entry, fit_text(entry, self.base)[1] if entry else None)

    # Acting

    def _selected_entry(self) -> AdapterEntry | None:
        return self.entries.get(self.selected_name() or "")

    @Slot()
    def _open_selected_in_chat(self, *_) -> None:
        entry = self._selected_entry()
        if entry is None:
            return
        if not entry.ok:
            self.banner.show_message(f"'{entry.name}' is damaged: {entry.problem}.", "Delete it and train or add it again.")
            return
        self.open_in_chat.emit(entry.name)

    @Slot()
    def _rename_selected(self) -> None:
        entry = self._selected_entry()
        if entry is None:
            return
        new_name, accepted = QInputDialog.getText(self, "Rename adapter", f"New name for '{entry.name}':", text=entry.name)
        if accepted and new_name.strip() and new_name.strip() != entry.name:
            self._act(lambda: self.library.rename(entry.name, new_name), select=new_name.strip(),
                      done=f"Renamed '{entry.name}' to '{new_name.strip()}'.")

    @Slot()
    def _delete_selected(self) -> None:
        entry = self._selected_entry()
        if entry is None:
            return
        answer = QMessageBox.question(
            self, "Delete adapter",
            f"Move '{entry.name}' to the trash?\n\nIt stays in {self.library.trash_dir} until you empty the trash.")
        if answer == QMessageBox.StandardButton.Yes:
            self._act(lambda: self.library.delete(entry.name), done=f"Moved '{entry.name}' to the trash.")

    @Slot()
    def _empty_trash(self) -> None:
        count = len(self.library.trash_entries())
        answer = QMessageBox.question(self, "Empty trash", f"Permanently remove {count} deleted adapter(s)? This cannot be undone.")
        if answer == QMessageBox.StandardButton.Yes:
            self._act(self.library.empty_trash, done="The trash is empty.")

    @Slot()
    def _open_report_card(self) -> None:
        entry = self._selected_entry()
        if entry is not None:
            view = open_report_card(self.library, entry.name)
            view.card_saved.connect(self.refresh, Qt.ConnectionType.UniqueConnection)

    def _open_selected_folder(self) -> None:
        entry = self._selected_entry()
        if entry is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(entry.path)))

    @Slot()
    def _add_peft_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a PEFT adapter folder")
        if not folder:
            return
        suggested = self.library.unique_name(_portable_name(Path(folder).name))
        name, accepted = QInputDialog.getText(self, "Add adapter", "Name in the library:", text=suggested)
        if accepted and name.strip():
            self._act(lambda: add_peft_folder(self.library, folder, name), select=name.strip(),
                      done=f"Added '{name.strip()}' to the library.")

    @Slot()
    def _import_bundle(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import a shared adapter", "", "Tailor bundles (*.tailor);;Zip files (*.zip)")
        if not path or self.import_job is not None:
            return
        self.import_button.setEnabled(False)
        self.banner.show_message(f"Checking {Path(path).name}…", tone="info")

        def import_it(report):
            # Checking the fit reads the base model's layout (torch), so it runs on the job's thread.
            from app.core.importer import import_adapter

            return import_adapter(self.library, path, progress=report)

        self.import_job = run_function(import_it)
        self.import_job.succeeded.connect(self._imported)
        self.import_job.failed.connect(lambda failure: self.banner.show_message(failure.message, failure.hint))
        self.import_job.finished.connect(self._import_finished)

    @Slot(object)
    def _imported(self, entry: AdapterEntry) -> None:
        self.banner.show_message(f"Imported '{entry.name}' into the library.", tone="success")
        self.refresh()
        self.select(entry.name)

    @Slot()
    def _import_finished(self) -> None:
        self.import_job = None
        self.import_button.setEnabled(True)

    @Slot()
    def _export_selected(self) -> None:
        entry = self._selected_entry()
        if entry is not None and entry.ok:
            from app.gui.export_dialog import ExportDialog

            ExportDialog(self.library, entry.name, self).open()

    def _act(self, action, done: str, select: str | None = None) -> None:
        """Run a library change, showing its outcome (or the user's mistake) on the panel, never as a traceback."""
        try:
            action()
        except (TailorError, OSError) as exc:
            hint = getattr(exc, "hint", None)
            self.banner.show_message(getattr(exc, "message", str(exc)), hint)
            return
        self.banner.show_message(done, tone="success")
        self.refresh()
        if select:
            self.select(select)


def _portable_name(folder_name: str) -> str:
    """A folder name as an adapter name: characters names may not hold become '-'."""
    cleaned = "".join(ch if ch.isalnum() or ch in " _.-" else "-" for ch in folder_name).strip(" .-_")
    return cleaned[:64] or "imported"


class AdapterDetails(QWidget):
    """Everything the manifest knows about one adapter: status, fit, system prompt, hyper-parameters, loss curve."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.title = QLabel("Select an adapter")
        self.title.setObjectName("pageTitle")
        self.fit = QLabel()
        self.fit.setWordWrap(True)
        self.summary = QFormLayout()
        self.prompt = QPlainTextEdit(readOnly=True)
        self.prompt.setMaximumHeight(64)
        self.prompt.setPlaceholderText("(no system prompt)")
        self.parameters = QTreeWidget()
        self.parameters.setHeaderLabels(["Setting", "Value"])
        self.parameters.setColumnWidth(0, 200)
        self.parameters.setMinimumHeight(120)
        self.loss_chart = LossCurve()
        self.loss_chart.setMinimumHeight(180)
        self.no_curve = QLabel("No training log: this adapter was not trained here (a mix or an import).")
        self.no_curve.setObjectName("muted")
        self.no_curve.setWordWrap(True)
        self.rank_chart = RankChart()
        self.rank_chart.setMinimumHeight(150)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addWidget(self.fit)
        layout.addLayout(self.summary)
        layout.addWidget(QLabel("System prompt"))
        layout.addWidget(self.prompt)
        layout.addWidget(self.parameters, 1)
        layout.addWidget(self.loss_chart, 2)
        layout.addWidget(self.no_curve)
        layout.addWidget(self.rank_chart, 1)
        self.show_entry(None, None)

    def show_entry(self, entry: AdapterEntry | None, fit_reason: str | None) -> None:
        while self.summary.rowCount():
            self.summary.removeRow(0)
        self.parameters.clear()
        for widget in (self.fit, self.prompt, self.parameters, self.loss_chart, self.no_curve):
            widget.setVisible(entry is not None)
        self.rank_chart.hide()
        if entry is None:
            self.title.setText("Select an adapter")
            return
        self.title.setText(entry.name)
        self.fit.setText(fit_reason or "")
        colour = BAD if entry.problem else GOOD if fit_reason and fit_reason.startswith("Fits") else WARN
        self.fit.setStyleSheet(f"color: {colour};")
        for label, value in (("Kind", entry.kind), ("Base model", entry.base_model_id or "unknown"),
                             ("Rank", entry.rank or "?"), ("Size", human_size(entry.size_bytes)),
                             ("Created", entry.created or "—"), ("Folder", str(entry.path))):
            value_label = QLabel(str(value))
            value_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.summary.addRow(label, value_label)
        self.prompt.setPlainText(entry.system_prompt or "")
        manifest = dict(entry.manifest or {})
        manifest.pop("system_prompt", None)
        if entry.ok:
            manifest["adapter_config"] = {key: value for key, value in entry.adapter_config().items() if value not in (None, {}, [])}
        _fill_tree(self.parameters.invisibleRootItem(), manifest)
        self.parameters.expandToDepth(0)
        log = _training_log(entry)
        self.loss_chart.set_log(log)
        self.loss_chart.setVisible(bool(log))
        self.no_curve.setVisible(not log)
        allocation = read_rank_allocation(entry.path)  # only AdaLoRA personas have one
        if allocation is not None:
            self.rank_chart.set_allocation(allocation)
            self.rank_chart.show()


class RankChart(LazyPlots):
    """Where an AdaLoRA persona's rank budget went: the average final rank of each decoder layer's adapted modules,
    with the target average drawn across."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.allocation: RankAllocation | None = None

    def set_allocation(self, allocation: RankAllocation) -> None:
        self.allocation = allocation
        self.changed()

    def build(self, layout: QVBoxLayout) -> None:
        import pyqtgraph as pg

        self.caption = QLabel()
        self.caption.setObjectName("muted")
        self.caption.setWordWrap(True)
        self.plot = static_plot("final rank", "layer", whole_numbers_below=True)
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.7, brush=ACCENT, pen=None)
        self.target_line = pg.InfiniteLine(angle=0, pen=pg.mkPen(WARN, width=2, style=Qt.PenStyle.DashLine))
        self.plot.addItem(self.bars)
        self.plot.addItem(self.target_line)
        layout.addWidget(self.caption)
        layout.addWidget(self.plot)

    def redraw(self) -> None:
        if self.allocation is None:
            return
        layers = self.allocation.by_layer()
        self.bars.setOpts(x=[layer for layer, _ in layers], height=[rank for _, rank in layers])
        every = max(1, len(layers) // 10)  # about ten whole-number layer labels, however deep the model
        self.plot.getAxis("bottom").setTicks([[(layer, str(layer)) for layer, _ in layers[::every]]])
        self.target_line.setValue(self.allocation.target_r)
        self.plot.setYRange(0, self.allocation.init_r, padding=0.05)
        self.caption.setText(
            f"AdaLoRA rank per layer: every layer started at {self.allocation.init_r}; pruning kept an average of "
            f"{self.allocation.average_rank:.1f} (dashed: the target {self.allocation.target_r}). Shared as plain "
            f"LoRA at rank {self.allocation.uniform_rank}.")


class LossCurve(LazyPlots):
    """The training loss of a finished adapter, raw and smoothed the way the training panel showed it live."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.eval_steps: list[int] = []
        self.eval_losses: list[float] = []

    def set_log(self, log: list[dict]) -> None:
        series = SmoothedSeries()
        self.steps = [point["step"] for point in log]
        self.losses = [point["loss"] for point in log]
        self.smoothed = [series.add(loss) for loss in self.losses]
        self.eval_steps = [point["step"] for point in log if isinstance(point.get("eval_loss"), (int, float))]
        self.eval_losses = [point["eval_loss"] for point in log if isinstance(point.get("eval_loss"), (int, float))]
        self.changed()

    def build(self, layout: QVBoxLayout) -> None:
        import pyqtgraph as pg

        plot = static_plot("loss", "step")
        plot.addLegend(offset=(-10, 10))
        self.raw_curve = plot.plot([], [], name="loss", pen=pg.mkPen("#9dbbe0", width=1))
        self.smooth_curve = plot.plot([], [], name="smoothed", pen=pg.mkPen(ACCENT, width=2.5))
        self.eval_curve = plot.plot([], [], name="held-out", pen=pg.mkPen(EVAL_COLOUR, width=2), symbol="o",
                                    symbolSize=7, symbolBrush=EVAL_COLOUR, symbolPen=None)
        layout.addWidget(plot)

    def redraw(self) -> None:
        self.raw_curve.setData(self.steps, self.losses)
        self.smooth_curve.setData(self.steps, self.smoothed)
        self.eval_curve.setData(self.eval_steps, self.eval_losses)


def _training_log(entry: AdapterEntry) -> list[dict]:
    try:
        return [point for point in entry.training_log() if "step" in point and "loss" in point]
    except (OSError, ValueError, TypeError):
        return []  # a damaged log only loses the curve; the adapter itself may be fine


def _fill_tree(parent: QTreeWidgetItem, value) -> None:
    for key, child in (value.items() if isinstance(value, dict) else enumerate(value)):
        item = QTreeWidgetItem(parent, [str(key)])
        if isinstance(child, dict) and child or isinstance(child, list) and any(isinstance(v, (dict, list)) for v in child):
            _fill_tree(item, child)
        else:
            item.setText(1, json.dumps(child) if isinstance(child, (dict, list)) else str(child))
            item.setToolTip(1, item.text(1))
