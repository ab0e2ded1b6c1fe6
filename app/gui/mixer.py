"""The persona mixer: pick adapters, set their weights with sliders, choose how peft combines them, then try the
mix in chat or save it into the library.

The mixer itself never touches a model: it builds a MixSpec, explains (live, from the adapters' configs) why a
combination cannot work, and asks the chat pane, which owns the loaded base, to preview or save it.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtWidgets import (
    QAbstractItemView, QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QHeaderView, QLabel, QLineEdit,
    QPushButton, QSlider, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
)

from app.core.config import validate_adapter_name
from app.core.errors import TailorError
from app.core.library import AdapterEntry, Library
from app.core.mixing import DENSITY_METHODS, METHOD_HELP, METHODS, MixSpec, mix_problem
from app.gui.style import BAD, MUTED

# Sliders move in hundredths; weights from -1 (subtract a persona) to 2 (exaggerate it).
WEIGHT_MIN, WEIGHT_MAX, SLIDER_SCALE = -1.0, 2.0, 100
USE, NAME, RANK, BASE_MODEL, WEIGHT, VALUE = range(6)


class PersonaMixer(QWidget):
    preview_requested = Signal(str, object)
    """(mix name, MixSpec): build the mix on the chat's base and open it in chat."""
    save_requested = Signal(str, object)
    """(mix name, MixSpec): build it if needed and write it into the library."""

    def __init__(self, library: Library, parent: QWidget | None = None):
        super().__init__(parent)
        self.library = library
        self.entries: dict[str, AdapterEntry] = {}
        self._rows: dict[str, tuple[QCheckBox, QSlider, QDoubleSpinBox]] = {}
        self._busy_reason: str | None = None

        title = QLabel("Persona mixer")
        title.setObjectName("pageTitle")
        subtitle = QLabel("Blend personas into a new one: tick adapters, set their weights, choose how to combine them.")
        subtitle.setObjectName("pageSubtitle")
        self.table = QTableWidget(0, 6)
        self.table.setHorizontalHeaderLabels(["Use", "Adapter", "Rank", "Base model", "Weight", ""])
        self.table.verticalHeader().hide()
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.table.horizontalHeader()
        for column in (USE, RANK, VALUE):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(NAME, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(BASE_MODEL, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(WEIGHT, QHeaderView.ResizeMode.Stretch)
        self.empty_label = QLabel("No usable adapters in the library yet.")
        self.empty_label.setObjectName("muted")

        self.method = QComboBox()
        for method in METHODS:
            self.method.addItem(method, method)
            self.method.setItemData(self.method.count() - 1, METHOD_HELP[method], Qt.ItemDataRole.ToolTipRole)
        self.method_help = QLabel()
        self.method_help.setObjectName("muted")
        self.method_help.setWordWrap(True)
        self.density = QDoubleSpinBox(minimum=0.05, maximum=1.0, singleStep=0.05, value=0.5, decimals=2)
        self.density.setToolTip("Share of each adapter's changes that TIES and DARE keep.")
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("name of the new adapter")
        self.problem = QLabel()
        self.problem.setWordWrap(True)
        self.preview_button = QPushButton("Preview in chat")
        self.save_button = QPushButton("Save mix")
        self.save_button.setObjectName("primary")
        self.card_button = QPushButton("Report card")
        self.card_button.setToolTip("Score the last saved mix against the base: style, loops, knowledge.")
        self.card_button.setEnabled(False)
        self.saved_mix: str | None = None
        """The mix saved last from here, which the Report card button evaluates."""
        self._saving: str | None = None

        form = QFormLayout()
        form.addRow("Method", self.method)
        form.addRow("", self.method_help)
        form.addRow("Density", self.density)
        form.addRow("Name", self.name_edit)
        buttons = QHBoxLayout()
        buttons.addWidget(self.card_button)
        buttons.addStretch(1)
        buttons.addWidget(self.preview_button)
        buttons.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.addWidget(title)
        layout.addWidget(subtitle)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.empty_label)
        layout.addLayout(form)
        layout.addWidget(self.problem)
        layout.addLayout(buttons)

        self.method.currentIndexChanged.connect(self._validate)
        self.density.valueChanged.connect(self._validate)
        self.name_edit.textChanged.connect(self._validate)
        self.preview_button.clicked.connect(lambda: self._request(self.preview_requested))
        self.save_button.clicked.connect(lambda: self._request(self.save_requested, saving=True))
        self.card_button.clicked.connect(self._open_report_card)
        self.refresh()

    @Slot()
    def refresh(self) -> None:
        """Re-read the library, keeping what the user ticked and the weights they set."""
        kept = {name: (check.isChecked(), spin.value()) for name, (check, _, spin) in self._rows.items()}
        self.entries = {entry.name: entry for entry in self.library.entries() if entry.ok}
        self._rows.clear()
        self.table.setRowCount(0)
        for entry in self.entries.values():
            self._add_row(entry, *kept.get(entry.name, (False, 1.0)))
        self.empty_label.setVisible(not self.entries)
        if self._saving and self.library.exists(self._saving):
            # The chat pane refreshes the mixer once the mix it was asked to save is in the library.
            self.saved_mix, self._saving = self._saving, None
            self.card_button.setText(f"Report card for '{self.saved_mix}'")
            self.card_button.setEnabled(True)
        if not self.name_edit.text() or self.library.exists(self.name_edit.text().strip()):
            self.name_edit.setText(self.library.unique_name("mix"))
        self._validate()

    def set_parents(self, weights: dict[str, float]) -> None:
        """Tick exactly these adapters with these weights (what a saved mix or a script asks for)."""
        for name, (check, _, spin) in self._rows.items():
            check.setChecked(name in weights)
            spin.setValue(weights.get(name, spin.value()))

    def set_method(self, method: str) -> None:
        self.method.setCurrentIndex(METHODS.index(method))

    def set_busy(self, reason: str | None) -> None:
        """Disable the buttons while the chat works on a mix (or cannot, e.g. during training), saying why."""
        self._busy_reason = reason
        self._validate()

    def spec(self) -> MixSpec:
        parents = tuple((name, spin.value()) for name, (check, _, spin) in self._rows.items() if check.isChecked())
        return MixSpec(parents, self.method.currentData(), self.density.value())

    def current_problem(self) -> str | None:
        """Why the mix as set up now cannot be previewed or saved; None when it can."""
        try:
            spec = self.spec()
            name = validate_adapter_name(self.name_edit.text())
        except TailorError as exc:
            return exc.message
        if self.library.exists(name):
            return f"An adapter named '{name}' already exists; pick another name."
        problem = mix_problem(spec, [self.entries[parent] for parent in spec.names])
        return f"Cannot mix these: {problem}." if problem else None

    def _add_row(self, entry: AdapterEntry, checked: bool, weight: float) -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        check = QCheckBox()
        check.setChecked(checked)
        slider = QSlider(Qt.Orientation.Horizontal)
        slider.setRange(int(WEIGHT_MIN * SLIDER_SCALE), int(WEIGHT_MAX * SLIDER_SCALE))
        spin = QDoubleSpinBox(minimum=WEIGHT_MIN, maximum=WEIGHT_MAX, singleStep=0.05, decimals=2)
        slider.valueChanged.connect(lambda value: spin.setValue(value / SLIDER_SCALE))
        spin.valueChanged.connect(lambda value: slider.setValue(round(value * SLIDER_SCALE)))
        spin.valueChanged.connect(self._validate)
        check.toggled.connect(self._validate)
        for control in (slider, spin):
            control.setEnabled(checked)
            check.toggled.connect(control.setEnabled)
        spin.setValue(weight)
        cell = QWidget()
        cell_layout = QHBoxLayout(cell)
        cell_layout.setContentsMargins(6, 0, 0, 0)
        cell_layout.addWidget(check)
        self.table.setCellWidget(row, USE, cell)
        for column, text in ((NAME, entry.name), (RANK, str(entry.rank or "?")), (BASE_MODEL, entry.base_model_id or "?")):
            self.table.setItem(row, column, _item(text))
        self.table.setCellWidget(row, WEIGHT, slider)
        self.table.setCellWidget(row, VALUE, spin)
        self._rows[entry.name] = (check, slider, spin)

    @Slot()
    def _validate(self, *_) -> None:
        method = self.method.currentData()
        self.method_help.setText(METHOD_HELP[method])
        self.density.setEnabled(method in DENSITY_METHODS)
        problem = self._busy_reason or self.current_problem()
        self.problem.setText(problem or f"Ready: {self.spec().describe()}")
        self.problem.setStyleSheet(f"color: {BAD if problem and not self._busy_reason else MUTED};")
        self.preview_button.setEnabled(problem is None)
        self.save_button.setEnabled(problem is None)

    def _request(self, signal, saving: bool = False) -> None:
        if self.current_problem() is None:
            if saving:
                self._saving = self.name_edit.text().strip()
            signal.emit(self.name_edit.text().strip(), self.spec())

    def _open_report_card(self) -> None:
        """The same report card as for a trained persona, computed fresh for the saved mix."""
        from app.gui.report_card import open_report_card

        if self.saved_mix and self.library.exists(self.saved_mix):
            open_report_card(self.library, self.saved_mix, evaluate=True)


def _item(text: str) -> QTableWidgetItem:
    item = QTableWidgetItem(text)
    item.setToolTip(text)
    return item
