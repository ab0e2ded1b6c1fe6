"""The four-step training wizard: base model → dataset → adapter → review, then Train."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QFrame, QHBoxLayout, QLabel, QPushButton, QScrollArea, QStackedWidget, QVBoxLayout, QWidget,
)

from app.core.config import DataSettings, ModelSource, RunConfig
from app.core.gpu import SystemSnapshot
from app.core.library import Library
from app.gui.style import repolish
from app.gui.wizard.adapter_page import AdapterPage
from app.gui.wizard.base import WizardContext, WizardPage
from app.gui.wizard.data_page import DataPage
from app.gui.wizard.model_page import ModelPage
from app.gui.wizard.review_page import ReviewPage

STEP_NAMES = ("Base model", "Dataset", "Adapter", "Review")


class TrainingWizard(QWidget):
    train_requested = Signal(object)
    """A complete RunConfig, emitted by Train on the last page."""
    page_entered = Signal(object)
    """The WizardPage now shown."""

    def __init__(self, library: Library, parent: QWidget | None = None):
        super().__init__(parent)
        self.context = WizardContext(library)
        self.model_page = ModelPage(self.context)
        self.adapter_page = AdapterPage(self.context)
        self.data_page = DataPage(self.context, max_len=self.adapter_page.max_len.value,
                                  system_prompt=lambda: self.adapter_page.system_prompt.toPlainText().strip() or None)
        self.review_page = ReviewPage(self.context, self.adapter_page, self.build_config)
        self.pages: list[WizardPage] = [self.model_page, self.data_page, self.adapter_page, self.review_page]
        self.adapter_page.max_len_changed.connect(self.data_page.set_max_len)
        self._training_allowed = True

        self.step_labels = []
        steps = QHBoxLayout()
        steps.setContentsMargins(16, 10, 16, 0)
        for number, name in enumerate(STEP_NAMES, start=1):
            if number > 1:
                arrow = QLabel("›")
                arrow.setObjectName("muted")
                steps.addWidget(arrow)
            label = QLabel(f"{number}  {name}")
            label.setObjectName("stepLabel")
            steps.addWidget(label)
            self.step_labels.append(label)
        steps.addStretch(1)

        self.stack = QStackedWidget()
        for page in self.pages:
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QFrame.Shape.NoFrame)
            scroll.setWidget(page)
            self.stack.addWidget(scroll)

        self.back_button = QPushButton("Back")
        self.back_button.clicked.connect(self.back)
        self.next_button = QPushButton("Next")
        self.next_button.setObjectName("primary")
        self.next_button.setDefault(True)
        self.next_button.clicked.connect(self.next)
        footer = QHBoxLayout()
        footer.setContentsMargins(16, 6, 16, 10)
        footer.addStretch(1)
        footer.addWidget(self.back_button)
        footer.addWidget(self.next_button)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addLayout(steps)
        layout.addWidget(self.stack, 1)
        layout.addLayout(footer)
        self.go_to(0)

    # Navigation

    @property
    def current_index(self) -> int:
        return self.stack.currentIndex()

    @property
    def current_page(self) -> WizardPage:
        return self.pages[self.current_index]

    def go_to(self, index: int) -> None:
        self.stack.setCurrentIndex(index)
        for number, label in enumerate(self.step_labels):
            label.setProperty("current", number == index)
            repolish(label)
        self._update_buttons()
        self.pages[index].enter()
        self.page_entered.emit(self.pages[index])

    def _update_buttons(self) -> None:
        last = self.current_index == len(self.pages) - 1
        self.back_button.setEnabled(self.current_index > 0)
        self.next_button.setText("Train" if last else "Next")
        self.next_button.setEnabled(self._training_allowed or not last)

    def next(self) -> None:
        page = self.current_page
        page.advance(lambda: self._moved_on_from(page))

    def _moved_on_from(self, page: WizardPage) -> None:
        if page is not self.current_page:
            return  # the user went elsewhere while the page was still working
        if page is self.review_page:
            self.train_requested.emit(self.build_config())
        else:
            self.go_to(self.current_index + 1)

    def back(self) -> None:
        if self.current_index > 0:
            self.go_to(self.current_index - 1)

    def restart(self) -> None:
        """Back to the first step for another persona, keeping the model and dataset as they are."""
        self.adapter_page.forget_name()
        self.go_to(0)

    # The run

    def build_config(self) -> RunConfig:
        """The RunConfig the four pages describe; raises TailorError when something is missing or invalid."""
        choices = self.adapter_page.choices()
        dataset = self.context.dataset
        return RunConfig(
            name=choices.name,
            system_prompt=choices.system_prompt,
            model=ModelSource(base=self.context.model.source, quant=choices.quant,
                              trust_remote_code=self.model_page.trust_remote_code.isChecked()),
            data=DataSettings(path=str(Path(dataset.path).expanduser().resolve()), format=dataset.format,
                              prompt_column=dataset.prompt_column, response_column=dataset.response_column,
                              max_len=choices.max_len, packing=choices.packing),
            lora=choices.lora,
            training=choices.training,
        )

    def restore(self, config: RunConfig) -> None:
        """Start from a previous run's choices (the model, the dataset if it is still there, the settings)."""
        self.model_page.set_source(config.model.base)
        if Path(config.data.path).exists():
            self.data_page.path_field.edit.setText(config.data.path)
            self.data_page.set_format(config.data.format)
        self.adapter_page.restore(config)

    def set_training_allowed(self, allowed: bool) -> None:
        """One training at a time: Train is disabled while a run is going."""
        self._training_allowed = allowed
        self._update_buttons()

    def update_snapshot(self, snapshot: SystemSnapshot) -> None:
        self.context.snapshot = snapshot
        if self.current_page is self.review_page:
            self.review_page.update_free_memory()
