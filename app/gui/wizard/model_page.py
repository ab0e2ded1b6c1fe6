"""Step 1: the base model. The bundled SmolLM2 is picked already, so a newcomer can just press Next."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QButtonGroup, QCheckBox, QComboBox, QFileDialog, QFormLayout, QGridLayout, QGroupBox, QHBoxLayout, QLabel,
    QLineEdit, QRadioButton, QVBoxLayout, QWidget,
)

from app.core.catalogue import CATALOGUE, DEFAULT_KEY, ModelShape, find_entry
from app.core.config import ModelSource
from app.core.estimate import estimate_training_memory
from app.gui import settings
from app.gui.style import gigabytes, parameter_count
from app.gui.wizard.base import ModelInfo, WizardContext, WizardPage
from app.gui.wizard.field_docs import tooltip
from app.gui.wizard.widgets import PathField
from app.gui.workers import Failure

BUNDLED, CATALOGUE_CHOICE, FOLDER, GGUF, HUB = "bundled", "catalogue", "folder", "gguf", "hub"

# The catalogue's VRAM figure is for one typical QLoRA set-up; the review page sizes the user's actual settings.
REFERENCE_SETTINGS = dict(quant="4bit", rank=16, max_len=512, batch_size=4, gradient_checkpointing=True, device="cuda")
REFERENCE_DESCRIPTION = "QLoRA 4-bit, rank 16, batch 4 × 512 tokens, gradient checkpointing"


def qlora_vram(shape: ModelShape) -> int:
    return estimate_training_memory(shape, **REFERENCE_SETTINGS).total


def prepare_model(source: str, display_name: str, trust_remote_code: bool, report: Callable[[str], None]) -> ModelInfo:
    """Resolve (convert or download on first use), then read the tokenizer and shape. Runs on a worker thread."""
    from transformers import AutoConfig

    from app.core.models import load_tokenizer, resolve_base

    resolved = resolve_base(source, progress=report)
    report("Reading the tokenizer and chat template…")
    tokenizer = load_tokenizer(resolved.folder, trust_remote_code)
    config = AutoConfig.from_pretrained(resolved.folder, local_files_only=True, trust_remote_code=trust_remote_code)
    return ModelInfo(source=source, display_name=display_name or resolved.model_id, model_id=resolved.model_id,
                     folder=resolved.folder, shape=ModelShape.from_hf_config(config), tokenizer=tokenizer)


class ModelPage(WizardPage):
    title = "Choose a base model"
    subtitle = ("The adapter learns on top of this model. The bundled SmolLM2 is small and already on your "
                "computer: a good first choice. Bigger models learn more but need more memory.")

    def __init__(self, context: WizardContext, parent: QWidget | None = None):
        super().__init__(context, parent)
        self._preparing: str | None = None

        default_entry = find_entry(DEFAULT_KEY)
        self.bundled = QRadioButton(f"Bundled: {default_entry.display_name}")
        self.bundled.setChecked(True)
        self.catalogue = QRadioButton("From the catalogue (downloaded from the Hugging Face hub on first use)")
        self.catalogue_combo = QComboBox()
        for entry in CATALOGUE:
            if entry.key != DEFAULT_KEY:
                self.catalogue_combo.addItem(
                    f"{entry.display_name} — {parameter_count(entry.parameter_count)} parameters, "
                    f"≈ {gigabytes(qlora_vram(entry.shape))} VRAM with QLoRA", entry.key)
        self.catalogue_combo.setToolTip(f"<p>VRAM estimated for {REFERENCE_DESCRIPTION}.</p>")
        self.folder = QRadioButton("A model folder on this computer (with config.json and safetensors)")
        self.folder_field = PathField("/path/to/model-folder", self._pick_folder)
        self.gguf = QRadioButton("A .gguf file (converted once into a reusable folder)")
        self.gguf_field = PathField("/path/to/model.gguf", self._pick_gguf)
        self.hub = QRadioButton("A Hugging Face hub id")
        self.hub_edit = QLineEdit()
        self.hub_edit.setPlaceholderText("e.g. Qwen/Qwen2.5-0.5B-Instruct")
        self.trust_remote_code = QCheckBox("Allow this model to run its own code (only for authors you trust)")
        self.trust_remote_code.setToolTip(tooltip(ModelSource, "trust_remote_code"))

        self.choices = QButtonGroup(self)
        for button, kind in ((self.bundled, BUNDLED), (self.catalogue, CATALOGUE_CHOICE), (self.folder, FOLDER),
                             (self.gguf, GGUF), (self.hub, HUB)):
            button.setProperty("kind", kind)
            self.choices.addButton(button)
        bundled_note = QLabel("Ships with Tailor, no download. 135M parameters: trains in minutes, even on a CPU.")
        bundled_note.setObjectName("muted")

        sources = QGroupBox("Where the model comes from")
        grid = QGridLayout(sources)
        grid.setColumnMinimumWidth(0, 22)
        grid.setColumnStretch(1, 1)
        row = 0
        for button, detail in ((self.bundled, bundled_note), (self.catalogue, self.catalogue_combo),
                               (self.folder, self.folder_field), (self.gguf, self.gguf_field),
                               (self.hub, self.hub_edit)):
            grid.addWidget(button, row, 0, 1, 2)
            grid.addWidget(detail, row + 1, 1)
            row += 2
        grid.addWidget(self.trust_remote_code, row, 1)
        grid.setVerticalSpacing(6)

        self.info = QGroupBox("Selected model")
        self.info_name = QLabel()
        self.info_architecture = QLabel()
        self.info_parameters = QLabel()
        self.info_context = QLabel()
        self.info_vram = QLabel()
        self.info_vram.setToolTip(f"<p>Estimated for {REFERENCE_DESCRIPTION}; the Review step sizes your own "
                                  "settings against your free memory.</p>")
        self.info_note = QLabel()
        self.info_note.setObjectName("muted")
        self.info_note.setWordWrap(True)
        form = QFormLayout(self.info)
        form.addRow("Model:", self.info_name)
        form.addRow("Architecture:", self.info_architecture)
        form.addRow("Parameters:", self.info_parameters)
        form.addRow("Context length:", self.info_context)
        form.addRow("VRAM for QLoRA:", self.info_vram)
        form.addRow(self.info_note)
        for label in (self.info_name, self.info_architecture, self.info_parameters, self.info_context):
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        layout = QHBoxLayout(self.body)
        layout.setContentsMargins(0, 0, 0, 0)
        # Spare height goes below the boxes, not between the options.
        for widget, stretch in ((sources, 3), (self.info, 2)):
            column = QVBoxLayout()
            column.addWidget(widget)
            column.addStretch(1)
            layout.addLayout(column, stretch)

        self.choices.buttonToggled.connect(lambda _button, checked: checked and self._selection_changed())
        self.catalogue_combo.currentIndexChanged.connect(lambda: self._select(self.catalogue))
        self.folder_field.edit.editingFinished.connect(lambda: self._select(self.folder))
        self.gguf_field.edit.editingFinished.connect(lambda: self._select(self.gguf))
        self.hub_edit.editingFinished.connect(lambda: self._select(self.hub))
        self._selection_changed()

    # The choice

    def kind(self) -> str:
        return self.choices.checkedButton().property("kind")

    def source(self) -> str:
        """The value for ModelSource.base; empty when the chosen option has no value yet."""
        return {
            BUNDLED: lambda: "default",
            CATALOGUE_CHOICE: lambda: self.catalogue_combo.currentData() or "",
            FOLDER: lambda: self.folder_field.edit.text().strip(),
            GGUF: lambda: self.gguf_field.edit.text().strip(),
            HUB: lambda: self.hub_edit.text().strip(),
        }[self.kind()]()

    def set_source(self, source: str) -> None:
        """Select whatever kind of source this is (used to restore the last run's choice)."""
        entry = find_entry(source)
        if source in ("default", DEFAULT_KEY):
            self.bundled.setChecked(True)
        elif entry is not None:
            self.catalogue_combo.setCurrentIndex(max(0, self.catalogue_combo.findData(entry.key)))
            self.catalogue.setChecked(True)
        elif source.lower().endswith(".gguf"):
            self.gguf_field.edit.setText(source)
            self.gguf.setChecked(True)
        elif Path(source).expanduser().is_dir():
            self.folder_field.edit.setText(source)
            self.folder.setChecked(True)
        else:
            self.hub_edit.setText(source)
            self.hub.setChecked(True)
        self._selection_changed()

    def _select(self, button: QRadioButton) -> None:
        if button.isChecked():
            self._selection_changed()
        else:
            button.setChecked(True)  # buttonToggled then calls _selection_changed

    def _pick_folder(self) -> str:
        return QFileDialog.getExistingDirectory(self, "Choose a model folder", settings.last_folder())

    def _pick_gguf(self) -> str:
        chosen, _filter = QFileDialog.getOpenFileName(self, "Choose a GGUF model", settings.last_folder(),
                                                      "GGUF models (*.gguf)")
        return chosen

    def _selection_changed(self) -> None:
        self.banner.clear()
        self.trust_remote_code.setVisible(self.kind() == HUB)
        source = self.source()
        self._show_catalogue_info(source)
        # Local files are cheap to inspect, so their details show right away; the bundled model is read on Next
        # (the GUI must not import the ML stack before it is needed) and hub models are only downloaded on Next.
        if self.kind() in (FOLDER, GGUF) and source and self._ready_model() is None:
            self._prepare(source)

    def _show_catalogue_info(self, source: str) -> None:
        model = self._ready_model()
        if model is not None:
            self._show_shape(model.display_name, model.shape, "")
            return
        entry = find_entry(DEFAULT_KEY if source == "default" else source) if source else None
        if entry is not None:
            note = "" if self.kind() == BUNDLED else "Downloaded from the hub when you press Next."
            self._show_shape(entry.display_name, entry.shape, note)
        else:
            for label in (self.info_architecture, self.info_parameters, self.info_context, self.info_vram):
                label.setText("—")
            self.info_name.setText(source or "—")
            self.info_note.setText("Details appear once the model has been read." if source else "")

    def _show_shape(self, name: str, shape: ModelShape, note: str) -> None:
        self.info_name.setText(name)
        known = "" if shape.is_known_architecture else " (sized like a Llama block: a rough guide)"
        self.info_architecture.setText(shape.architecture + known)
        self.info_parameters.setText(f"{parameter_count(shape.parameter_count)} ({shape.parameter_count:,})")
        context = shape.max_position_embeddings
        self.info_context.setText(f"{context:,} tokens" if context else "unknown")
        self.info_vram.setText(f"≈ {gigabytes(qlora_vram(shape))}")
        self.info_note.setText(note)

    # Preparing the model

    def _ready_model(self) -> ModelInfo | None:
        model = self.context.model
        return model if model is not None and model.source == self.source() else None

    def _display_name(self, source: str) -> str:
        entry = find_entry(DEFAULT_KEY if source == "default" else source)
        return entry.display_name if entry else Path(source).name if self.kind() in (FOLDER, GGUF) else source

    def _prepare(self, source: str) -> None:
        if self._preparing == source:
            return
        self._preparing = source
        trust = self.trust_remote_code.isChecked()
        display_name = self._display_name(source)
        self.run_job(lambda report: prepare_model(source, display_name, trust, report),
                     f"Reading {display_name}…", self._prepared, lambda failure: self._prepare_failed(source, failure))

    def _prepared(self, model: ModelInfo) -> None:
        if self._preparing == model.source:
            self._preparing = None
        self.context.model = model
        if model.source == self.source():  # else the user picked something else meanwhile: keep it for later
            self._show_catalogue_info(model.source)

    def _prepare_failed(self, source: str, failure: Failure) -> None:
        if self._preparing != source:
            return  # an earlier choice failed after the user moved on; its error would only confuse
        self._preparing = None
        self.show_failure(failure)

    def validate(self) -> str | None:
        if not self.source():
            return {FOLDER: "Choose a model folder.", GGUF: "Choose a .gguf file.",
                    HUB: "Type a hub id such as Qwen/Qwen2.5-0.5B-Instruct.",
                    CATALOGUE_CHOICE: "Choose a model from the catalogue."}[self.kind()]
        return None

    def advance(self, proceed: Callable[[], None]) -> None:
        if not self.is_busy and self.validate() is None and self._ready_model() is None:
            self._prepare(self.source())
        super().advance(proceed)
