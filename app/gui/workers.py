"""Running slow core work (model conversion, dataset scans, training) off the GUI thread.

The shape follows napari/superqt: a worker QObject moved to a plain QThread, `thread.started → worker.run`,
`worker.finished → thread.quit`, `thread.finished → thread.deleteLater`. The worker is not `deleteLater`-ed on its
own thread: PySide 6.11 deadlocked there (the ending thread destroyed the worker holding the GIL and waiting for
Qt's connection lock, while the GUI thread held that lock waiting for the GIL). The Job lets go of it on the GUI
thread once the thread has ended, and it is deleted there. A `Job` is the GUI thread's view of one such worker: the
worker's signals are relayed through it, so whatever a page connects to them runs on the GUI thread. (PySide6 runs a
lambda connected straight to a worker's signal on the *worker's* thread, which is how GUIs end up touching widgets
from the wrong thread.) Training goes one step further: its worker drives a child process (see TrainingWorker).
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from typing import Any, Callable

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from app.core.config import RunConfig
from app.core.library import Library
from app.core.training import SAMPLE_PROMPTS, TrainingControl, TrainingResult, event_from_dict, run_training
from app.gui import training_process
from app.gui.failures import OUT_OF_MEMORY, UNEXPECTED, Failure, ReportedFailure, describe_failure

# Jobs whose thread is still running; Python must keep their wrappers alive, or it would delete a running QThread.
_active_jobs: set[Job] = set()
CONTROL_POLL_S = 0.1
"""How often a training worker passes the Pause/Stop flags on to its child process."""


class Worker(QObject):
    """Runs `work()` once on whatever thread it was moved to; reports through signals only."""

    event = Signal(object)
    """Progress: status text from loaders, training events from the trainer."""
    succeeded = Signal(object)
    failed = Signal(object)
    """A Failure."""
    finished = Signal()

    @Slot()
    def run(self) -> None:
        try:
            result = self.work()
        except Exception as exc:  # every failure must reach the GUI as a message, not kill the thread silently
            self.failed.emit(describe_failure(exc))
        else:
            self.succeeded.emit(result)
        finally:
            self.finished.emit()

    def work(self) -> Any:
        raise NotImplementedError


class FunctionWorker(Worker):
    """Calls `function(report)`; `report(text)` shows progress while the function runs."""

    def __init__(self, function: Callable[[Callable[[object], None]], Any]):
        super().__init__()
        self._function = function

    def work(self) -> Any:
        return self._function(self.event.emit)


class TrainingWorker(Worker):
    """One run_training call: a new run, or the continuation of a paused or interrupted one (resume=True).

    By default the run happens in a child process (app.gui.training_process), which this worker's thread drives:
    it turns the child's lines back into the core's events and passes on the Pause/Stop flags the GUI sets on
    `control`. isolated=False calls run_training on this thread instead, sharing the GIL with the window.
    """

    def __init__(self, config: RunConfig, library: Library, control: TrainingControl, resume: bool = False,
                 isolated: bool = True):
        super().__init__()
        self.config, self.library, self.control, self.resume = config, library, control, resume
        self.isolated = isolated

    def work(self) -> TrainingResult:
        if not self.isolated:
            return run_training(self.config, self.library, sink=self.event.emit, control=self.control,
                                resume=self.resume, sample_prompts=SAMPLE_PROMPTS)
        child = subprocess.Popen(training_process.child_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, encoding="utf-8")
        child.stdin.write(training_process.request_line(self.config, self.library, self.resume))
        child.stdin.flush()
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_read_lines, args=(child.stdout, lines), name="training-output", daemon=True).start()
        outcome, forwarded = None, set()
        while True:
            self._forward_requests(child, forwarded)
            try:
                line = lines.get(timeout=CONTROL_POLL_S)
            except queue.Empty:
                continue
            if line is None:
                break
            message = json.loads(line)
            event = event_from_dict(message)
            if event is not None:
                self.event.emit(event)
            else:
                outcome = message
        child.stdin.close()
        code = child.wait()
        return self._result(outcome, code)

    def _forward_requests(self, child: subprocess.Popen, forwarded: set[str]) -> None:
        for command, requested in ((training_process.STOP, self.control.stop_requested),
                                   (training_process.PAUSE, self.control.pause_requested)):
            if requested and command not in forwarded:
                forwarded.add(command)
                try:
                    child.stdin.write(command + "\n")
                    child.stdin.flush()
                except (BrokenPipeError, OSError):
                    pass  # the child has ended already; its outcome is on the way

    def _result(self, outcome: dict | None, exit_code: int) -> TrainingResult:
        if outcome is None:
            raise ReportedFailure(Failure(
                f"The training process ended unexpectedly (exit code {exit_code}).",
                "If the computer ran out of memory, lower the batch size or use Auto-fit; "
                "the run can be resumed from its last checkpoint.", OUT_OF_MEMORY if exit_code == -9 else UNEXPECTED))
        if outcome["type"] == training_process.FAILURE:
            raise ReportedFailure(training_process.failure_from_dict(outcome))
        adapter = self.library.get(outcome["adapter"]) if outcome["adapter"] else None
        return TrainingResult(adapter, outcome["steps"], outcome["total_steps"], outcome["final_loss"],
                              paused=outcome["paused"], stopped_early=outcome["stopped_early"])


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


class Job(QObject):
    """A worker on its own QThread, seen from the GUI thread. `finished` fires once the thread has really ended."""

    event = Signal(object)
    succeeded = Signal(object)
    failed = Signal(object)
    finished = Signal()

    def __init__(self, worker: Worker):
        super().__init__()
        self._thread: QThread | None = QThread()
        self._thread.setObjectName(type(worker).__name__)
        worker.moveToThread(self._thread)
        self._thread.started.connect(worker.run)
        # Direct: quit() is thread-safe, and a queued call would wait for the GUI thread, which wait() may block.
        worker.finished.connect(self._thread.quit, Qt.ConnectionType.DirectConnection)
        self._thread.finished.connect(self._thread_ended)
        self._thread.finished.connect(self._thread.deleteLater)
        # Signal-to-signal: the receiver is this GUI-thread object, so Qt queues each emission over to it.
        worker.event.connect(self.event)
        worker.succeeded.connect(self.succeeded)
        worker.failed.connect(self.failed)
        self._worker = worker

    def start(self) -> Job:
        _active_jobs.add(self)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None

    def wait(self, timeout_ms: int) -> bool:
        """Block until the thread ends (True) or the timeout passes (False); for shutdown only."""
        return self._thread is None or self._thread.wait(timeout_ms)

    @Slot()
    def _thread_ended(self) -> None:
        self._thread = None
        self._worker = None
        _active_jobs.discard(self)
        self.finished.emit()


def run_function(function: Callable[[Callable[[object], None]], Any]) -> Job:
    return Job(FunctionWorker(function)).start()


def wait_for_all_jobs(timeout_ms: int) -> bool:
    """At exit: give running jobs a chance to end so no QThread is destroyed while it runs."""
    return all(job.wait(timeout_ms) for job in list(_active_jobs))
