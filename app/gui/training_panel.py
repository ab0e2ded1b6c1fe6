"""The training panel: a run in progress (loss chart, learning rate, speed, ETA), with Pause, Stop and what comes after.

The run itself is `run_training`, driven by a TrainingWorker on its own thread (in a child process by default, see
app.gui.training_process). Pause and Stop set flags on the run's TrainingControl straight from the GUI thread: a
queued slot would never run while the worker's thread is busy, and the flags are threading.Events, safe to set from
anywhere; the worker passes them on to the child.
"""

from __future__ import annotations

import dataclasses
import html

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QFrame, QGridLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton, QTextBrowser, QVBoxLayout, QWidget,
)

from app.core.config import RunConfig
from app.core.library import Library
from app.core.training import (
    CheckpointEvent, EvalEvent, PausedEvent, RecoveryEvent, SampleEvent, StartEvent, StatusEvent, StepEvent,
    TrainingControl, TrainingResult, discard_interrupted_run, interrupted_run_config,
)
from app.gui.style import ACCENT, duration, gigabytes
from app.gui.wizard.base import Banner
from app.gui.wizard.widgets import LazyPlots, static_plot
from app.gui.workers import OUT_OF_MEMORY, Failure, Job, TrainingWorker

AXIS_WIDTH = 86
"""Both charts' y axes get this width, so their shared step axis lines up."""
EVAL_COLOUR = "#d9822b"
EMA_DECAY = 0.9
"""Weight of the past in the smoothed loss: about the last ten readings count."""
IDLE, RUNNING, PAUSING, STOPPING, PAUSED, FINISHED, FAILED = (
    "idle", "running", "pausing", "stopping", "paused", "finished", "failed")


class SmoothedSeries:
    """An exponential moving average with bias correction, so the first points are not dragged towards zero."""

    def __init__(self, decay: float = EMA_DECAY):
        self.decay = decay
        self._average = 0.0
        self._count = 0

    def add(self, value: float) -> float:
        self._count += 1
        self._average = self.decay * self._average + (1 - self.decay) * value
        return self._average / (1 - self.decay ** self._count)


class LossChart(LazyPlots):
    """Loss per step, raw and smoothed, over the learning rate; keeps every point of the run."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.reset()

    def reset(self) -> None:
        self.total_steps: int | None = None
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.learning_rates: list[float] = []
        self.eval_steps: list[int] = []
        self.eval_losses: list[float] = []
        self._ema = SmoothedSeries()
        self.changed()

    def set_total_steps(self, total_steps: int) -> None:
        """Once the run's length is known, the step axis spans the whole run from the start."""
        if total_steps != self.total_steps:
            self.total_steps = total_steps
            self.changed()

    def add_point(self, step: int, loss: float, learning_rate: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.smoothed.append(self._ema.add(loss))
        self.learning_rates.append(learning_rate)
        self.changed()

    def add_eval_point(self, step: int, eval_loss: float) -> None:
        self.eval_steps.append(step)
        self.eval_losses.append(eval_loss)
        self.changed()

    def build(self, layout: QVBoxLayout) -> None:
        import pyqtgraph as pg

        self.loss_plot = static_plot("loss", "step", whole_numbers_below=True, left_axis_width=AXIS_WIDTH)
        self.loss_plot.addLegend(offset=(-10, 10))
        # Long runs reach tens of thousands of points; drawing only what a pixel column can show keeps it cheap.
        self.loss_plot.setDownsampling(auto=True, mode="peak")
        self.loss_plot.setClipToView(True)
        self.raw_curve = self.loss_plot.plot([], [], name="loss", pen=pg.mkPen("#9dbbe0", width=1))
        self.smooth_curve = self.loss_plot.plot([], [], name="smoothed", pen=pg.mkPen(ACCENT, width=2.5))
        self.eval_curve = self.loss_plot.plot([], [], name="held-out", pen=pg.mkPen(EVAL_COLOUR, width=2),
                                              symbol="o", symbolSize=7, symbolBrush=EVAL_COLOUR, symbolPen=None)
        self.lr_plot = static_plot("learning rate", "step", whole_numbers_below=True, left_axis_width=AXIS_WIDTH)
        self.lr_plot.setMaximumHeight(140)
        self.lr_plot.setXLink(self.loss_plot)
        self.lr_plot.getAxis("left").enableAutoSIPrefix(False)
        self.lr_curve = self.lr_plot.plot([], [], pen=pg.mkPen("#8e6bb0", width=2))
        layout.addWidget(self.loss_plot, 3)
        layout.addWidget(self.lr_plot, 1)

    def redraw(self) -> None:
        # A fixed step axis also spares re-laying out the axis at every point.
        if self.total_steps:
            self.loss_plot.setXRange(0, self.total_steps, padding=0.02)
        else:
            self.loss_plot.enableAutoRange(axis="x")
        self.raw_curve.setData(self.steps, self.losses)
        self.smooth_curve.setData(self.steps, self.smoothed)
        self.eval_curve.setData(self.eval_steps, self.eval_losses)
        self.lr_curve.setData(self.steps, self.learning_rates)


class StatTile(QFrame):
    """A caption over a value: 'ETA' over '4:56'."""

    def __init__(self, caption: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("statTile")
        self.caption = QLabel(caption)
        self.caption.setObjectName("statCaption")
        self.value = QLabel("—")
        self.value.setObjectName("statValue")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 6, 10, 6)
        layout.setSpacing(0)
        layout.addWidget(self.caption)
        layout.addWidget(self.value)

    def set(self, text: str) -> None:
        self.value.setText(text)


class TrainingPanel(QWidget):
    adapter_ready = Signal(str)
    """A run finished and its adapter is in the library (the library panel should refresh)."""
    chat_requested = Signal(str)
    new_run_requested = Signal()
    running_changed = Signal(bool)
    training_gpu = Signal(object)
    """The DeviceIdentity of the GPU the run trains on, as its own process reports it."""

    def __init__(self, library: Library, parent: QWidget | None = None):
        super().__init__(parent)
        self.library = library
        self.config: RunConfig | None = None
        self.control: TrainingControl | None = None
        self.job: Job | None = None
        self.state = IDLE
        self.result: TrainingResult | None = None
        self.failure: Failure | None = None
        self.recoveries: list[str] = []
        """What out-of-memory recovery did during this run, in words."""

        self.title = QLabel("No training yet")
        self.title.setObjectName("pageTitle")
        self.status = QLabel("Set up a run in the wizard and press Train.")
        self.status.setObjectName("pageSubtitle")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setFormat("step %v of %m")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.banner = Banner()

        self.tiles = {key: StatTile(caption) for key, caption in (
            ("step", "Step"), ("loss", "Loss (smoothed)"), ("lr", "Learning rate"), ("speed", "Tokens / s"),
            ("eval", "Held-out loss"), ("elapsed", "Elapsed"), ("eta", "Time left"), ("memory", "Memory"),
            ("checkpoint", "Last checkpoint"))}
        tiles = QGridLayout()
        tiles.setSpacing(6)
        for column, tile in enumerate(self.tiles.values()):
            tiles.addWidget(tile, 0, column)

        self.chart = LossChart()
        self.samples = QTextBrowser()
        self.samples.setObjectName("sampleReplies")
        self.samples.setMaximumHeight(110)
        self.samples.setToolTip("<p>At each evaluation the persona answers a few questions it never trained on, so "
                                "you can watch it take shape.</p>")

        self.pause_button = QPushButton("Pause")
        self.pause_button.setToolTip("<p>Save a checkpoint and free the model's memory; Resume continues from it.</p>")
        self.pause_button.clicked.connect(self.pause_or_resume)
        self.stop_button = QPushButton("Stop and save")
        self.stop_button.setToolTip("<p>Finish now: the adapter trained so far is saved into the library.</p>")
        self.stop_button.clicked.connect(self.stop)
        self.retry_button = QPushButton()
        self.retry_button.clicked.connect(self.retry_with_smaller_batch)
        self.chat_button = QPushButton()
        self.chat_button.setObjectName("primary")
        self.chat_button.clicked.connect(lambda: self.chat_requested.emit(self.config.name))
        self.new_run_button = QPushButton("Train another persona")
        self.new_run_button.clicked.connect(self.new_run_requested)
        buttons = QHBoxLayout()
        for button in (self.pause_button, self.stop_button, self.retry_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.new_run_button)
        buttons.addWidget(self.chat_button)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(16, 12, 16, 10)
        layout.setSpacing(8)
        layout.addWidget(self.title)
        layout.addWidget(self.status)
        layout.addWidget(self.banner)
        layout.addWidget(self.progress)
        layout.addLayout(tiles)
        layout.addWidget(self.chart, 1)
        layout.addWidget(self.samples)
        layout.addLayout(buttons)
        self._reset_chart()
        self._set_state(IDLE)

    # Starting, pausing, stopping

    @property
    def is_running(self) -> bool:
        return self.job is not None

    @property
    def paused_run(self) -> str | None:
        """The run this panel holds paused (its own Resume button continues it)."""
        return self.config.name if self.state == PAUSED else None

    def start(self, config: RunConfig) -> None:
        """A new run of `config`."""
        self._reset_chart()
        self._launch(config, resume=False)

    def resume(self, name: str) -> None:
        """Continue an interrupted or paused run from its last checkpoint, with the config it started with."""
        if self.config is None or self.config.name != name:
            self._reset_chart()
        self._launch(interrupted_run_config(self.library, name), resume=True)

    def pause_or_resume(self) -> None:
        if self.state == PAUSED:
            self.resume(self.config.name)
        else:
            self.pause()

    def pause(self) -> None:
        if self.state == RUNNING:
            self.control.request_pause()
            self._set_state(PAUSING)

    def stop(self) -> None:
        """Save what has been learnt so far as the adapter; from a pause, that is the checkpoint's weights."""
        if self.state == RUNNING:
            self.control.request_stop()
            self._set_state(STOPPING)
        elif self.state == PAUSED:
            self._launch(interrupted_run_config(self.library, self.config.name), resume=True, stop_at_once=True)

    def retry_with_smaller_batch(self) -> None:
        """After running out of memory: the same run with half the batch and twice the accumulation."""
        training = self.config.training
        smaller = dataclasses.replace(training, batch_size=max(1, training.batch_size // 2),
                                      grad_accum=training.grad_accum * 2)
        # The failed run's folder holds the old batch size, and a resumed run keeps its config: start afresh.
        discard_interrupted_run(self.library, self.config.name)
        self.start(self.config.replace(training=smaller))

    def pause_for_exit(self) -> bool:
        """Ask a running job to checkpoint and end (the next start offers to resume). True if one is still running."""
        if self.state == RUNNING:
            self.pause()
        return self.is_running

    def _launch(self, config: RunConfig, resume: bool, stop_at_once: bool = False) -> None:
        self.config = config
        self.control = TrainingControl()
        if stop_at_once:
            self.control.request_stop()
        self.result = self.failure = None
        self.title.setText(f"Training “{config.name}”")
        self.status.setText("Starting…")
        self.banner.clear()
        self.job = Job(TrainingWorker(config, self.library, self.control, resume=resume))
        self.job.event.connect(self._on_event)
        self.job.succeeded.connect(self._on_result)
        self.job.failed.connect(self.show_failure)
        self.job.finished.connect(self._on_job_finished)
        self._set_state(STOPPING if stop_at_once else RUNNING)
        self.job.start()
        self.running_changed.emit(True)

    # Events from the run

    def _on_event(self, event) -> None:
        if isinstance(event, StatusEvent):
            self.status.setText(event.message)
        elif isinstance(event, StartEvent):
            self.chart.set_total_steps(event.total_steps)
            self.progress.setRange(0, event.total_steps)
            self.progress.setValue(event.start_step)
            self.tiles["step"].set(f"{event.start_step} / {event.total_steps}")
            resumed = f", resuming at step {event.start_step}" if event.start_step else ""
            self.status.setText(f"Training on the {event.device.upper()}: {event.examples:,} examples, "
                                f"{event.trainable_params:,} trainable parameters{resumed}.")
            if event.gpu is not None:
                self.training_gpu.emit(event.gpu)
        elif isinstance(event, StepEvent):
            self._add_point(event)
        elif isinstance(event, EvalEvent):
            self.chart.add_eval_point(event.step, event.eval_loss)
            self.tiles["eval"].set(f"{event.eval_loss:.3f}" + (" ★" if event.best else ""))
        elif isinstance(event, SampleEvent):
            self._show_samples(event)
        elif isinstance(event, RecoveryEvent):
            self.recoveries.append(event.message)
            self.banner.show_message("Ran out of memory; carrying on with smaller batches.", event.message,
                                     tone="warning")
        elif isinstance(event, (CheckpointEvent, PausedEvent)):
            self.tiles["checkpoint"].set(f"step {event.step}")

    def _add_point(self, event: StepEvent) -> None:
        self.chart.add_point(event.step, event.loss, event.learning_rate)
        self.progress.setValue(event.step)
        self.tiles["step"].set(f"{event.step} / {event.total_steps}")
        self.tiles["loss"].set(f"{self.chart.smoothed[-1]:.3f}")
        self.tiles["lr"].set(f"{event.learning_rate:.1e}")
        self.tiles["speed"].set(f"{event.tokens_per_s:,.0f}")
        self.tiles["elapsed"].set(duration(event.elapsed_s))
        self.tiles["eta"].set(duration(event.eta_s))
        self.tiles["memory"].set(gigabytes(event.memory_bytes))

    def _show_samples(self, event: SampleEvent) -> None:
        rows = "".join(f"<p style='margin:2px 0'><b>{html.escape(sample['prompt'])}</b><br>"
                       f"<span style='color:{ACCENT}'>{html.escape(sample['reply']) or '…'}</span></p>"
                       for sample in event.samples)
        self.samples.setHtml(f"<p style='margin:0;color:gray'>Replies at step {event.step}, to questions it never "
                             f"trained on:</p>{rows}")
        self.samples.show()

    def _on_result(self, result: TrainingResult) -> None:
        self.result = result
        if result.paused:
            self.status.setText(f"Paused at step {result.steps} of {result.total_steps}. The model's memory has "
                                "been released; Resume continues from the checkpoint.")
            self._set_state(PAUSED)
            return
        loss = f", final loss {result.final_loss:.3f}" if result.final_loss is not None else ""
        early = " (stopped early)" if result.stopped_early else ""
        self.status.setText(f"Saved “{result.adapter.name}” to the library after {result.steps} steps{early}{loss}.")
        recovered = " ".join(self.recoveries)
        self.banner.show_message(f"“{result.adapter.name}” is ready.",
                                 (recovered + " " if recovered else "") + "Chat with it now, or find it in the Library.",
                                 tone="success")
        self.tiles["eta"].set("done")
        self._set_state(FINISHED)
        self.adapter_ready.emit(result.adapter.name)

    def show_failure(self, failure: Failure) -> None:
        """A failed run: the reason and the fix on the panel; out of memory also offers a smaller batch."""
        self.failure = failure
        self.status.setText("Training stopped because of a problem.")
        self.banner.show_message(failure.message, failure.hint)
        self._set_state(FAILED)

    def _on_job_finished(self) -> None:
        self.job = None
        self.running_changed.emit(False)

    # Display state

    def _reset_chart(self) -> None:
        self.chart.reset()
        for tile in self.tiles.values():
            tile.set("—")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.samples.clear()
        self.samples.hide()
        self.recoveries = []

    def _set_state(self, state: str) -> None:
        self.state = state
        busy = state in (RUNNING, PAUSING, STOPPING)
        self.pause_button.setText("Resume" if state == PAUSED else "Pause")
        self.pause_button.setVisible(busy or state == PAUSED)
        self.pause_button.setEnabled(state in (RUNNING, PAUSED))
        self.stop_button.setVisible(busy or state == PAUSED)
        self.stop_button.setEnabled(state in (RUNNING, PAUSED))
        if state == PAUSING:
            self.status.setText("Pausing after this step: saving a checkpoint and releasing memory…")
        elif state == STOPPING:
            self.status.setText("Stopping: saving the adapter trained so far…")
        can_retry = (state == FAILED and self.failure is not None and self.failure.kind == OUT_OF_MEMORY
                     and self.config.training.batch_size > 1)
        self.retry_button.setVisible(can_retry)
        if can_retry:
            training = self.config.training
            self.retry_button.setText(f"Retry with batch size {max(1, training.batch_size // 2)} "
                                      f"× {training.grad_accum * 2} accumulation")
        self.chat_button.setVisible(state == FINISHED)
        if state == FINISHED:
            self.chat_button.setText(f"Chat with {self.config.name}")
        # From a pause too: the paused run stays in the list of unfinished runs, to resume later.
        self.new_run_button.setVisible(state in (FINISHED, FAILED, IDLE, PAUSED))
        self.new_run_button.setText("Back to the wizard" if state == FAILED else "Train another persona")
        self.progress.setStyleSheet("" if state != FAILED else "QProgressBar::chunk { background: #c0392b; }")
