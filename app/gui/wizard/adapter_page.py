"""Step 3: the adapter: who the persona is, how much it can learn (rank), and how long it trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup, QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
    QPlainTextEdit, QPushButton, QSpinBox, QToolButton, QVBoxLayout, QWidget,
)

from app.core.config import (
    ALL_LINEAR, METHODS, SCHEDULES, TRAINING_QUANTS, DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings,
    validate_adapter_name,
)
from app.core.errors import TailorError
from app.core.estimate import FitSuggestion, checkpointing_words
from app.gui.wizard.base import WizardContext, WizardPage
from app.gui.wizard.field_docs import tooltip

RANK_PRESETS = (("Light", 8), ("Balanced", 16), ("Strong", 64))
METHOD_NAMES = {"lora": "LoRA (same rank in every layer)", "adalora": "AdaLoRA (rank goes where it helps)"}
QUANT_NAMES = {"auto": "Automatic (16-bit when it fits comfortably, else 4-bit)", "4bit": "4-bit (QLoRA, least memory)",
               "8bit": "8-bit", "none": "None (16-bit LoRA: fastest and most exact, most memory)"}
CHECKPOINTING_CHOICES = (("Automatic (off when memory allows)", (None, 1)), ("On, every block (least memory)", (True, 1)),
                         ("On, every other block (faster, more memory)", (True, 2)), ("Off (fastest)", (False, 1)))
"""(TrainingSettings.gradient_checkpointing, .checkpoint_every_n_layers) for each choice."""
ATTENTION_LAYERS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
"""Attention projections by their peft names; Phi-3 fuses q, k and v into qkv_proj."""


@dataclass(frozen=True)
class AdapterChoices:
    """Everything this page decides, already validated by the config dataclasses."""

    name: str
    system_prompt: str | None
    quant: str
    max_len: int
    packing: bool
    lora: LoraSettings
    training: TrainingSettings


def _spin(minimum: int, maximum: int, value: int, step: int = 1) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(minimum, maximum)
    spin.setSingleStep(step)
    spin.setValue(value)
    return spin


def _double_spin(minimum: float, maximum: float, value: float, step: float, decimals: int) -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setRange(minimum, maximum)
    spin.setSingleStep(step)
    spin.setDecimals(decimals)
    spin.setValue(value)
    return spin


class AdapterPage(WizardPage):
    title = "Set up the adapter"
    subtitle = ("Name the persona and say how it should behave. The defaults suit a first run; hover over any "
                "setting for what it does.")

    max_len_changed = Signal(int)

    def __init__(self, context: WizardContext, parent: QWidget | None = None):
        super().__init__(context, parent)
        lora, training, data = LoraSettings(), TrainingSettings(), DataSettings(path="-")
        self._name_edited = False

        self.name = QLineEdit()
        self.name.setPlaceholderText("e.g. pirate")
        self.name.textEdited.connect(self._mark_name_edited)
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setPlaceholderText("e.g. You are a cheerful pirate who answers in pirate speak.")
        self.system_prompt.setTabChangesFocus(True)

        self.rank = _spin(1, 1024, lora.rank)
        self.rank_presets = QButtonGroup(self)
        self.rank_presets.setExclusive(False)
        presets = QHBoxLayout()
        presets.setSpacing(4)
        for label, value in RANK_PRESETS:
            button = QPushButton(f"{label} {value}")
            button.setObjectName("preset")
            button.setCheckable(True)
            button.setToolTip(f"<p>Rank {value}, alpha {2 * value}.</p>")
            button.clicked.connect(lambda _checked, rank=value: self.set_rank_preset(rank))
            self.rank_presets.addButton(button, value)
            presets.addWidget(button)
        presets.addWidget(self.rank)
        self.rank.valueChanged.connect(self._sync_rank_presets)
        self.alpha = _double_spin(0.5, 4096, lora.alpha, 1, 1)
        self.targets = QComboBox()
        self.targets.setEditable(True)
        self.targets.addItems([ALL_LINEAR, "q_proj, k_proj, v_proj, o_proj"])
        self.quant = QComboBox()
        for key in TRAINING_QUANTS:
            self.quant.addItem(QUANT_NAMES[key], key)

        self.epochs = _double_spin(0.1, 100, training.epochs, 0.5, 1)
        self.learning_rate = QLineEdit(f"{training.learning_rate:g}")
        self.batch_size = _spin(1, 512, training.batch_size)
        self.max_len = _spin(16, 131072, data.max_len, 64)
        self.max_len.valueChanged.connect(self.max_len_changed)

        self.use_dora = QCheckBox("DoRA (weight-decomposed LoRA)")
        self.use_rslora = QCheckBox("rsLoRA (rank-stabilised scaling)")
        self.dropout = _double_spin(0, 0.9, lora.dropout, 0.05, 2)
        self.grad_accum = _spin(1, 1024, training.grad_accum)
        self.gradient_checkpointing = QComboBox()
        for label, value in CHECKPOINTING_CHOICES:
            self.gradient_checkpointing.addItem(label, value)
        self.max_steps = _spin(0, 10_000_000, 0)
        self.max_steps.setSpecialValueText("by epochs")
        self.schedule = QComboBox()
        self.schedule.addItems(SCHEDULES)
        self.warmup = _double_spin(0, 0.99, training.warmup_ratio, 0.01, 2)
        self.packing = QCheckBox("Pack examples (no padding)")
        self.checkpoint_every = _spin(1, 1_000_000, training.checkpoint_every)
        self.seed = _spin(0, 2**31 - 1, training.seed)
        self.method = QComboBox()
        for key in METHODS:
            self.method.addItem(METHOD_NAMES[key], key)
        self.init_r = _spin(1, 1024, lora.init_r)
        self.target_r = _spin(1, 1024, lora.target_r)
        self.tinit = _double_spin(0, 0.95, lora.tinit, 0.05, 2)
        self.tfinal = _double_spin(0, 0.95, lora.tfinal, 0.05, 2)
        self.delta_t = _spin(1, 100_000, lora.deltaT)
        self.method.currentIndexChanged.connect(self._method_changed)

        persona = QGroupBox("Persona")
        persona_form = QFormLayout(persona)
        self._row(persona_form, "Name:", self.name, RunConfig, "name")
        self._row(persona_form, "System prompt:", self.system_prompt, RunConfig, "system_prompt")

        adapter = QGroupBox("Adapter (LoRA)")
        adapter_form = QFormLayout(adapter)
        self._row(adapter_form, "Rank:", presets, LoraSettings, "rank", extra=[self.rank, *self.rank_presets.buttons()])
        rank_help = QLabel("Light suits a tone or style, Balanced most personas, Strong many new facts or a new "
                           "format (a bigger adapter, more memory).")
        rank_help.setObjectName("muted")
        rank_help.setWordWrap(True)
        adapter_form.addRow("", rank_help)
        self._row(adapter_form, "Alpha:", self.alpha, LoraSettings, "alpha")
        self._row(adapter_form, "Target modules:", self.targets, LoraSettings, "target_modules")
        self._row(adapter_form, "Quantisation:", self.quant, ModelSource, "quant")

        run = QGroupBox("Training")
        run_form = QFormLayout(run)
        self._row(run_form, "Epochs:", self.epochs, TrainingSettings, "epochs")
        self._row(run_form, "Learning rate:", self.learning_rate, TrainingSettings, "learning_rate")
        self._row(run_form, "Batch size:", self.batch_size, TrainingSettings, "batch_size")
        self._row(run_form, "Max length:", self.max_len, DataSettings, "max_len")

        self.advanced_toggle = QToolButton()
        self.advanced_toggle.setText("Advanced")
        self.advanced_toggle.setCheckable(True)
        self.advanced_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_toggle.setAutoRaise(True)
        self.advanced = QGroupBox()
        advanced_columns = QHBoxLayout(self.advanced)
        left, middle, right, adaptive = QFormLayout(), QFormLayout(), QFormLayout(), QFormLayout()
        self._row(left, "", self.use_dora, LoraSettings, "use_dora")
        self._row(left, "", self.use_rslora, LoraSettings, "use_rslora")
        self._row(left, "Dropout:", self.dropout, LoraSettings, "dropout")
        self._row(middle, "Gradient accumulation:", self.grad_accum, TrainingSettings, "grad_accum")
        self._row(middle, "Gradient checkpointing:", self.gradient_checkpointing, TrainingSettings,
                  "gradient_checkpointing")
        self._row(middle, "", self.packing, DataSettings, "packing")
        self._row(middle, "Max steps:", self.max_steps, TrainingSettings, "max_steps")
        self._row(right, "Schedule:", self.schedule, TrainingSettings, "lr_schedule")
        self._row(right, "Warm-up share:", self.warmup, TrainingSettings, "warmup_ratio")
        self._row(right, "Checkpoint every (steps):", self.checkpoint_every, TrainingSettings, "checkpoint_every")
        self._row(right, "Seed:", self.seed, TrainingSettings, "seed")
        self._row(adaptive, "Method:", self.method, LoraSettings, "method")
        self._row(adaptive, "Starting rank:", self.init_r, LoraSettings, "init_r")
        self._row(adaptive, "Average final rank:", self.target_r, LoraSettings, "target_r")
        self._row(adaptive, "Train before pruning:", self.tinit, LoraSettings, "tinit")
        self._row(adaptive, "Train after pruning:", self.tfinal, LoraSettings, "tfinal")
        self._row(adaptive, "Steps between reallocations:", self.delta_t, LoraSettings, "deltaT")
        for form in (left, middle, right, adaptive):
            advanced_columns.addLayout(form, 1)
        self.advanced.hide()
        self.advanced_toggle.toggled.connect(self._show_advanced)

        columns = QHBoxLayout()
        columns.addWidget(persona, 4)
        columns.addWidget(adapter, 3)
        columns.addWidget(run, 3)
        layout = QVBoxLayout(self.body)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(columns)
        layout.addWidget(self.advanced_toggle)
        layout.addWidget(self.advanced)
        layout.addStretch(1)
        # Every field starts at the dataclass defaults (the same ones `tailor train` uses), including the ones
        # built above without a value (schedule, checkboxes, quant, method).
        self.restore(RunConfig(name="defaults", data=data))
        self._sync_rank_presets(self.rank.value())
        self._method_changed()

    def _row(self, form: QFormLayout, label: str, field, owner: type, name: str, extra=()) -> None:
        text = tooltip(owner, name)
        caption = QLabel(label)
        for widget in (caption, field if isinstance(field, QWidget) else None, *extra):
            if widget is not None:
                widget.setToolTip(text)
        form.addRow(caption, field)

    def _show_advanced(self, shown: bool) -> None:
        self.advanced.setVisible(shown)
        self.advanced_toggle.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)

    def _method_changed(self) -> None:
        """AdaLoRA sets its own ranks and scale, so the fixed rank, DoRA and rsLoRA only apply to plain LoRA."""
        adaptive = self.method.currentData() == "adalora"
        for widget in (self.init_r, self.target_r, self.tinit, self.tfinal, self.delta_t):
            widget.setEnabled(adaptive)
        for widget in (self.rank, self.use_dora, self.use_rslora, *self.rank_presets.buttons()):
            widget.setEnabled(not adaptive)
        if adaptive:
            self.use_dora.setChecked(False)
            self.use_rslora.setChecked(False)

    def _mark_name_edited(self) -> None:
        self._name_edited = True

    def forget_name(self) -> None:
        """For the next persona: propose a fresh name again instead of keeping the one just trained."""
        self._name_edited = False
        self.name.clear()

    # Rank presets

    def set_rank_preset(self, rank: int) -> None:
        """A preset sets rank and alpha together (alpha = 2 x rank, the usual LoRA scaling)."""
        self.rank.setValue(rank)
        self.alpha.setValue(2 * rank)
        self._sync_rank_presets(rank)

    def _sync_rank_presets(self, rank: int) -> None:
        for button in self.rank_presets.buttons():
            button.setChecked(self.rank_presets.id(button) == rank)

    # Reading and writing the form

    def enter(self) -> None:
        dataset = self.context.dataset
        if dataset is not None and not self._name_edited:
            self.name.setText(self.context.library.unique_name(_name_from(Path(dataset.path).stem)))
        model = self.context.model
        if model is not None:
            names = [layer.name for layer in model.shape.linear_layers()]
            self.targets.setItemText(1, ", ".join(name for name in names if name in ATTENTION_LAYERS))

    def target_modules(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.targets.currentText().split(",") if part.strip())

    def learning_rate_value(self) -> float:
        try:
            return float(self.learning_rate.text())
        except ValueError:
            raise TailorError(f"'{self.learning_rate.text()}' is not a learning rate.",
                              "Type a number such as 2e-4 or 0.0002.") from None

    def choices(self) -> AdapterChoices:
        """The page's settings, validated; raises TailorError with a message for the page."""
        name = validate_adapter_name(self.name.text())
        library = self.context.library
        if library.exists(name):
            raise TailorError(f"The library already has an adapter called '{name}'.", "Pick another name.")
        if name in library.interrupted_runs():
            raise TailorError(f"'{name}' has an interrupted run.",
                              "Resume or discard it (see the note above the wizard), or pick another name.")
        lora = LoraSettings(rank=self.rank.value(), alpha=self.alpha.value(), dropout=self.dropout.value(),
                            target_modules=self.target_modules(), use_dora=self.use_dora.isChecked(),
                            use_rslora=self.use_rslora.isChecked(), method=self.method.currentData(),
                            init_r=self.init_r.value(), target_r=self.target_r.value(), tinit=self.tinit.value(),
                            tfinal=self.tfinal.value(), deltaT=self.delta_t.value())
        training = TrainingSettings(
            epochs=self.epochs.value(), max_steps=self.max_steps.value() or None,
            learning_rate=self.learning_rate_value(), lr_schedule=self.schedule.currentText(),
            warmup_ratio=self.warmup.value(), batch_size=self.batch_size.value(), grad_accum=self.grad_accum.value(),
            gradient_checkpointing=self.gradient_checkpointing.currentData()[0],
            checkpoint_every_n_layers=self.gradient_checkpointing.currentData()[1], seed=self.seed.value(),
            checkpoint_every=self.checkpoint_every.value(),
        )
        system_prompt = self.system_prompt.toPlainText().strip() or None
        return AdapterChoices(name, system_prompt, self.quant.currentData(), self.max_len.value(),
                              self.packing.isChecked(), lora, training)

    def validate(self) -> str | None:
        try:
            self.choices()
        except TailorError as exc:
            return str(exc)
        return None

    def restore(self, config: RunConfig) -> None:
        """Start from a previous run's settings (not its name: that adapter exists now)."""
        lora, training = config.lora, config.training
        self.system_prompt.setPlainText(config.system_prompt or "")
        self.rank.setValue(lora.rank)
        self.alpha.setValue(lora.alpha)
        self.dropout.setValue(lora.dropout)
        self.targets.setCurrentText(", ".join(lora.target_modules))
        self.use_dora.setChecked(lora.use_dora)
        self.use_rslora.setChecked(lora.use_rslora)
        self.method.setCurrentIndex(max(0, self.method.findData(lora.method)))
        self.init_r.setValue(lora.init_r)
        self.target_r.setValue(lora.target_r)
        self.tinit.setValue(lora.tinit)
        self.tfinal.setValue(lora.tfinal)
        self.delta_t.setValue(lora.deltaT)
        self.quant.setCurrentIndex(max(0, self.quant.findData(config.model.quant)))
        self.max_len.setValue(config.data.max_len)
        self.packing.setChecked(config.data.packing)
        self.epochs.setValue(training.epochs)
        self.max_steps.setValue(training.max_steps or 0)
        self.learning_rate.setText(f"{training.learning_rate:g}")
        self.schedule.setCurrentText(training.lr_schedule)
        self.warmup.setValue(training.warmup_ratio)
        self.batch_size.setValue(training.batch_size)
        self.grad_accum.setValue(training.grad_accum)
        self._select_checkpointing(training.gradient_checkpointing, training.checkpoint_every_n_layers)
        self.checkpoint_every.setValue(training.checkpoint_every)
        self.seed.setValue(training.seed)

    def apply_fit(self, fit: FitSuggestion) -> None:
        self.batch_size.setValue(fit.batch_size)
        self.grad_accum.setValue(fit.grad_accum)
        self.max_len.setValue(fit.max_len)
        if fit.gradient_checkpointing:  # auto-fit only ever turns it on; an automatic choice stays automatic otherwise
            self._select_checkpointing(True, fit.checkpoint_every_n_layers)

    def _select_checkpointing(self, on: bool | None, every_n_layers: int) -> None:
        wanted = (on, every_n_layers if on else 1)
        choices = [self.gradient_checkpointing.itemData(index) for index in range(self.gradient_checkpointing.count())]
        if wanted not in choices:  # an interval only the command line offers, kept when a run is repeated
            self.gradient_checkpointing.addItem(checkpointing_words(True, every_n_layers, "On,{}"), wanted)
            choices.append(wanted)
        self.gradient_checkpointing.setCurrentIndex(choices.index(wanted))


def _name_from(stem: str) -> str:
    """A usable adapter name from a file name: unusual characters become '-'."""
    cleaned = "".join(ch if ch.isalnum() or ch in " _.-" else "-" for ch in stem).strip(" .-_")[:64]
    return cleaned or "persona"
