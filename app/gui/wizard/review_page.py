"""Step 4: review. What will be trained, and whether it fits: the memory estimate against what is free right now."""

from __future__ import annotations

from typing import Callable

import psutil
from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QIcon, QPainter, QPen, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView, QFormLayout, QGroupBox, QHBoxLayout, QHeaderView, QLabel, QPushButton, QTableWidget,
    QTableWidgetItem, QVBoxLayout, QWidget,
)

from app.core.config import RunConfig
from app.core.errors import TailorError
from app.core.estimate import (
    FITS, TIGHT, MemoryEstimate, MemoryPlan, auto_fit, estimate_training_memory, memory_plan_for_run, verdict,
)
from app.core.footprint import Footprint, describe_adapter, footprint
from app.gui.style import BAD, GOOD, MUTED, WARN, gigabytes
from app.gui.wizard.adapter_page import AdapterPage
from app.gui.wizard.base import WizardContext, WizardPage
from app.gui.wizard.field_docs import tooltip
from app.gui.workers import run_function

SEGMENT_COLOURS = ("#4e79a7", "#59a14f", "#edc948", "#f28e2b", "#e15759", "#b07aa1", "#9c755f", "#bab0ac")
"""One per part MemoryEstimate.rows() can list: seven, and on the CPU the model file."""
VERDICT_COLOURS = {FITS: GOOD, TIGHT: WARN}


class MemoryBar(QWidget):
    """The estimate as stacked parts, with a marker where the free memory ends."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.estimate: MemoryEstimate | None = None
        self.available = 0
        self.setMinimumHeight(64)

    def sizeHint(self) -> QSize:
        return QSize(420, 64)

    def show_estimate(self, estimate: MemoryEstimate | None, available: int) -> None:
        self.estimate, self.available = estimate, available
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        bar = QRectF(0, 8, self.width() - 1, 26)
        painter.setPen(QPen(QColor("#c9ced6")))
        painter.setBrush(QColor("#eef0f3"))
        painter.drawRoundedRect(bar, 4, 4)
        if self.estimate is None:
            return
        scale = bar.width() / max(self.estimate.total, self.available, 1) / 1.08
        x = bar.left()
        painter.setPen(Qt.PenStyle.NoPen)
        for (_label, amount), colour in zip(self.estimate.rows(), SEGMENT_COLOURS):
            width = amount * scale
            painter.setBrush(QColor(colour))
            painter.drawRect(QRectF(x, bar.top() + 1, width, bar.height() - 2))
            x += width
        painter.setPen(QColor("#1f2328"))
        metrics = painter.fontMetrics()
        need = f"needs {gigabytes(self.estimate.total)}"
        painter.drawText(int(min(x + 6, self.width() - metrics.horizontalAdvance(need))),
                         int(bar.center().y() + metrics.ascent() / 2 - 1), need)
        marker = bar.left() + self.available * scale
        painter.setPen(QPen(QColor("#1f2328"), 2, Qt.PenStyle.DashLine))
        painter.drawLine(int(marker), 2, int(marker), int(bar.bottom() + 6))
        painter.setPen(QColor("#1f2328"))
        text = f"free now: {gigabytes(self.available)}"
        left = min(max(0, marker - metrics.horizontalAdvance(text) / 2), self.width() - metrics.horizontalAdvance(text))
        painter.drawText(int(left), int(bar.bottom() + 8 + metrics.ascent()), text)


class ReviewPage(WizardPage):
    title = "Review and train"
    subtitle = "Check the settings and whether the run fits in memory, then press Train."

    def __init__(self, context: WizardContext, adapter_page: AdapterPage, build_config: Callable[[], RunConfig],
                 parent: QWidget | None = None):
        super().__init__(context, parent)
        self._adapter_page = adapter_page
        self._build_config = build_config
        self.estimate: MemoryEstimate | None = None
        self.verdict = ""

        self.summary = QFormLayout()
        next_steps = QLabel("Training runs in the background and the chart shows the loss falling as the persona "
                            "learns. Pause frees the memory and resumes later, even after closing Tailor; Stop "
                            "keeps what has been learnt so far. The adapter then appears in the Library, ready "
                            "to chat with.")
        next_steps.setObjectName("muted")
        next_steps.setWordWrap(True)
        summary_box = QGroupBox("What will be trained")
        summary_column = QVBoxLayout(summary_box)
        summary_column.addLayout(self.summary)
        summary_column.addSpacing(12)
        summary_column.addWidget(next_steps)
        summary_column.addStretch(1)
        self.footprint: Footprint | None = None
        self._footprint_request = 0
        self.footprint_note = QLabel("Counting with peft…")
        self.footprint_note.setObjectName("muted")
        self.footprint_note.setWordWrap(True)
        self.footprint_table = QTableWidget(0, 4)
        self.footprint_table.setHorizontalHeaderLabels(["", "This run", "Full fine-tuning", "Share"])
        self.footprint_table.verticalHeader().hide()
        self.footprint_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.footprint_table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.footprint_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.footprint_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.footprint_table.setSizeAdjustPolicy(QAbstractItemView.SizeAdjustPolicy.AdjustToContents)
        self.footprint_table.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        footprint_box = QGroupBox("What LoRA saves")
        footprint_box.setToolTip("<p>This run's adapter against training every weight of the base model: the "
                                 "parameters it trains, the file it saves and the memory it needs.</p>")
        footprint_column = QVBoxLayout(footprint_box)
        footprint_column.addWidget(self.footprint_table)
        footprint_column.addWidget(self.footprint_note)
        left_column = QVBoxLayout()
        left_column.addWidget(summary_box, 1)
        left_column.addWidget(footprint_box)

        self.bar = MemoryBar()
        self.verdict_label = QLabel()
        self.verdict_label.setWordWrap(True)
        self.auto_fit_button = QPushButton("Auto-fit")
        self.auto_fit_button.setToolTip("<p>Pick batch size, gradient accumulation, max length and gradient "
                                        "checkpointing so the run fits in the free memory with room to spare.</p>")
        self.auto_fit_button.clicked.connect(self.apply_auto_fit)
        self.changes = QLabel()
        self.changes.setWordWrap(True)
        self.changes.setObjectName("muted")
        self.breakdown = QTableWidget(0, 2)
        self.breakdown.setHorizontalHeaderLabels(["Part", "Memory"])
        self.breakdown.verticalHeader().hide()
        self.breakdown.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.breakdown.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.breakdown.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.breakdown.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.breakdown.verticalHeader().setDefaultSectionSize(24)
        self.breakdown.setSizeAdjustPolicy(QAbstractItemView.SizeAdjustPolicy.AdjustToContents)
        self.breakdown.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

        memory_box = QGroupBox("Memory")
        memory = QVBoxLayout(memory_box)
        memory.addWidget(self.bar)
        verdict_row = QHBoxLayout()
        verdict_row.addWidget(self.verdict_label, 1)
        verdict_row.addWidget(self.auto_fit_button, 0, Qt.AlignmentFlag.AlignTop)
        memory.addLayout(verdict_row)
        memory.addWidget(self.changes)
        memory.addWidget(self.breakdown)
        memory.addStretch(1)

        layout = QHBoxLayout(self.body)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(left_column, 1)
        layout.addWidget(memory_box, 1)

    # Where the run will happen and what is free there

    def device(self) -> str:
        """Where the run will train: the GPU torch will use (matched by identity, not NVML's index), else the CPU."""
        snapshot = self.context.snapshot
        return "cuda" if snapshot is not None and snapshot.training_gpu is not None else "cpu"

    def available_memory(self) -> int:
        snapshot = self.context.snapshot
        if snapshot is not None and snapshot.training_gpu is not None:
            gpu = snapshot.training_gpu
            return gpu.memory_total - gpu.memory_used
        if snapshot is not None:
            return snapshot.ram_total - snapshot.ram_used
        return int(psutil.virtual_memory().available)  # before the strip's first reading

    def place(self) -> str:
        """Which memory the estimate is weighed against."""
        return f"VRAM on GPU {self.context.snapshot.training_gpu.index}" if self.device() == "cuda" else "system RAM"

    def runs_on(self) -> str:
        snapshot = self.context.snapshot
        if self.device() == "cuda":
            return f"GPU {snapshot.training_gpu.index}: {snapshot.training_gpu.name} (QLoRA in VRAM)"
        return "the CPU (no NVIDIA GPU found), in system RAM"

    # Showing the review

    def enter(self) -> None:
        self.changes.clear()
        self.refresh()
        self.count_footprint()

    def count_footprint(self) -> None:
        """Count the adapter with peft on a worker (torch and the model build take a moment); a newer request
        overrides an older one still running."""
        try:
            config = self._build_config()
        except TailorError:
            return  # refresh() already shows why
        steps, device = total_steps(config, self.context.dataset.report.usable_rows), self.device()
        self._footprint_request += 1
        request = self._footprint_request
        self.footprint_note.setText("Counting with peft…")
        job = run_function(lambda report: footprint(config, steps, device))
        job.succeeded.connect(lambda result: self._show_footprint(result, request))
        job.failed.connect(lambda failure: self._footprint_failed(failure, request))

    def _footprint_failed(self, failure, request: int) -> None:
        if request == self._footprint_request:
            self.footprint_note.setText(f"Could not count the adapter: {failure.message}")

    def _show_footprint(self, result: Footprint, request: int) -> None:
        if request != self._footprint_request:
            return
        self.footprint = result
        rows = result.rows()
        self.footprint_table.setRowCount(len(rows))
        for row, (label, this_run, full, share) in enumerate(rows):
            self.footprint_table.setItem(row, 0, QTableWidgetItem(label))
            for column, text in enumerate((this_run, full, share), start=1):
                self.footprint_table.setItem(row, column, _right_aligned(text, bold=column == 1))
        bound = " The AdaLoRA file size is an upper bound: pruning decides the final rank." \
            if result.adapter_size_is_bound else ""
        self.footprint_note.setText(f"{result.trainable_params:,} of {result.total_params:,} parameters are "
                                    f"trained; the rest stay frozen{' in 4-bit' if '4-bit' in result.base_model else ''}."
                                    + bound)

    def refresh(self) -> None:
        """Recompute the estimate for the current settings; cheap arithmetic, so also done on every GPU reading."""
        try:
            config = self._build_config()
            self.estimate = self._estimate(config)
        except TailorError as exc:
            self.estimate = None
            self.banner.show_message(exc.message, exc.hint)
            self.bar.show_estimate(None, 0)
            return
        self.banner.clear()
        self._show_summary(config)
        self.update_free_memory()

    def update_free_memory(self) -> None:
        """Weigh the estimate against what is free now: called on refresh and on every GPU strip reading."""
        if self.estimate is None:
            return
        available = self.available_memory()
        self.verdict = verdict(self.estimate.total, available)
        self._show_verdict(available)
        self._show_breakdown(available)
        self.bar.show_estimate(self.estimate, available)

    def _plan(self, config: RunConfig) -> MemoryPlan:
        """How the base and activations will be held: 'auto' decides from the estimates and the memory free now."""
        return memory_plan_for_run(config, self.context.model.shape, self.device(), self.available_memory())

    def _estimate(self, config: RunConfig) -> MemoryEstimate:
        plan = self._plan(config)
        return estimate_training_memory(
            self.context.model.shape, quant=plan.quant, rank=config.lora.largest_rank,
            target_modules=config.lora.target_modules, max_len=config.data.max_len,
            batch_size=config.training.batch_size, gradient_checkpointing=plan.gradient_checkpointing,
            checkpoint_every_n_layers=plan.checkpoint_every_n_layers, device=self.device(),
            fused_lora=config.lora.fused_forward,
        )

    def _show_summary(self, config: RunConfig) -> None:
        while self.summary.rowCount():
            self.summary.removeRow(0)
        model, dataset = self.context.model, self.context.dataset
        training = config.training
        rows = [
            ("Persona", config.name),
            ("Base model", f"{model.display_name}: {self._plan(config).reason}"),
            ("Dataset", f"{dataset.report.usable_rows:,} examples from {dataset.loaded.path.name}"),
            ("Adapter", describe_adapter(config)),
            ("Length", f"{total_steps(config, dataset.report.usable_rows):,} optimizer steps "
                       + ("(set by max steps)" if training.max_steps else f"({training.epochs:g} epochs)")),
            ("Batch", f"{training.batch_size} × {training.grad_accum} accumulation = "
                      f"{training.batch_size * training.grad_accum} examples per step, "
                      f"up to {config.data.max_len} tokens each"),
            ("Learning rate", f"{training.learning_rate:g}, {training.lr_schedule}"),
            ("Runs on", self.runs_on()),
        ]
        for label, value in rows:
            text = QLabel(value)
            text.setWordWrap(True)
            text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.summary.addRow(f"{label}:", text)

    def _show_verdict(self, available: int) -> None:
        need, free = gigabytes(self.estimate.total), gigabytes(available)
        if self.verdict == FITS:
            text = f"Fits: needs about {need}, and {free} of {self.place()} is free."
        elif self.verdict == TIGHT:
            text = (f"Tight: needs about {need} of the {free} free. Another program could tip it over; "
                    "Auto-fit leaves more room.")
        else:
            text = (f"Won't fit: needs about {need}, but only {free} of {self.place()} is free. "
                    "Press Auto-fit, or lower the batch size or max length.")
        colour = VERDICT_COLOURS.get(self.verdict, BAD)
        self.verdict_label.setText(f"<span style='color:{colour}; font-size:15px; font-weight:600'>{text}</span>")

    def _show_breakdown(self, available: int) -> None:
        rows = self.estimate.rows()
        self.breakdown.setRowCount(len(rows) + 2)
        for row, ((label, amount), colour, field) in enumerate(zip(rows, SEGMENT_COLOURS, self.estimate.row_fields())):
            part = QTableWidgetItem(_swatch(colour), label)
            part.setToolTip(tooltip(MemoryEstimate, field))
            self.breakdown.setItem(row, 0, part)
            self.breakdown.setItem(row, 1, _right_aligned(gigabytes(amount)))
        total = QTableWidgetItem("Total")
        font = total.font()
        font.setBold(True)
        total.setFont(font)
        self.breakdown.setItem(len(rows), 0, total)
        self.breakdown.setItem(len(rows), 1, _right_aligned(gigabytes(self.estimate.total), bold=True))
        free = QTableWidgetItem(f"Free now ({self.place()})")
        free.setToolTip("<p>What is free at this moment; other programs can take or give back memory.</p>")
        free.setForeground(QColor(MUTED))
        self.breakdown.setItem(len(rows) + 1, 0, free)
        self.breakdown.setItem(len(rows) + 1, 1, _right_aligned(gigabytes(available)))

    # Auto-fit

    def apply_auto_fit(self) -> None:
        try:
            config = self._build_config()
            training = config.training
            plan = self._plan(config)
            fit = auto_fit(
                self.context.model.shape, self.available_memory(), quant=plan.quant,
                rank=config.lora.largest_rank,
                target_modules=config.lora.target_modules, max_len=config.data.max_len,
                batch_size=training.batch_size, grad_accum=training.grad_accum,
                gradient_checkpointing=plan.gradient_checkpointing,
                checkpoint_every_n_layers=plan.checkpoint_every_n_layers, device=self.device(),
                fused_lora=config.lora.fused_forward,
            )
        except TailorError as exc:
            self.banner.show_message(exc.message, exc.hint)
            return
        self._adapter_page.apply_fit(fit)
        self.refresh()
        self.changes.setText("Auto-fit: " + " ".join(fit.changes) if fit.changes
                             else "Auto-fit: these settings already fit; nothing changed.")

    def validate(self) -> str | None:
        try:
            self._build_config()
        except TailorError as exc:
            return str(exc)
        return None


def total_steps(config: RunConfig, examples: int) -> int:
    """The optimizer steps run_training will take (the same arithmetic as its loop)."""
    return config.training.planned_steps(examples)


def _swatch(colour: str) -> QIcon:
    pixmap = QPixmap(12, 12)
    pixmap.fill(QColor(colour))
    return QIcon(pixmap)


def _right_aligned(text: str, bold: bool = False) -> QTableWidgetItem:
    item = QTableWidgetItem(text)
    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    if bold:
        font = item.font()
        font.setBold(True)
        item.setFont(font)
    return item
