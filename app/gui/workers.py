"""Running slow core work (model conversion, dataset scans, training) off the GUI thread.

The shape follows napari/superqt: a worker QObject moved to a plain QThread, `thread.started → worker.run`,
`worker.finished → thread.quit`, `deleteLater` on both. A `Job` is the GUI thread's view of one such worker: the
worker's signals are relayed through it, so whatever a page connects to them runs on the GUI thread. (PySide6 runs a
lambda connected straight to a worker's signal on the *worker's* thread, which is how GUIs end up touching widgets
from the wrong thread.)
"""

from __future__ import annotations

import errno
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, Signal, Slot

from app.core.config import RunConfig
from app.core.errors import TailorError
from app.core.library import Library

log = logging.getLogger("tailor.gui")

USER_ERROR, OUT_OF_MEMORY, DISK_FULL, UNEXPECTED = "user", "out_of_memory", "disk_full", "unexpected"

# Jobs whose thread is still running; Python must keep their wrappers alive, or it would delete a running QThread.
_active_jobs: set[Job] = set()


@dataclass(frozen=True)
class Failure:
    """Why a job failed, in words for the user (the traceback goes to the log, never on screen)."""

    message: str
    hint: str | None
    kind: str


def describe_failure(exc: BaseException) -> Failure:
    if isinstance(exc, TailorError):
        return Failure(exc.message, exc.hint, USER_ERROR)
    if _is_out_of_memory(exc):
        return Failure("Training ran out of memory.",
                       "Lower the batch size or the max length, or use Auto-fit on the Review page.", OUT_OF_MEMORY)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return Failure(f"The disk is full{where}.",
                       "Free some disk space, then resume the run: its last checkpoint is kept.", DISK_FULL)
    if isinstance(exc, OSError):
        return Failure(f"Could not read or write a file: {exc.strerror or exc}"
                       + (f" ({exc.filename})" if exc.filename else ""),
                       "Check the file exists and that you may write to the library folder.", USER_ERROR)
    log.error("Unexpected error in a background job", exc_info=exc)
    return Failure(f"Something went wrong: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                   "This is a bug in Tailor; the full details were written to the log.", UNEXPECTED)


def _is_out_of_memory(exc: BaseException) -> bool:
    # torch is only in sys.modules if a worker imported it; checking there keeps torch out of the GUI's imports.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError (or MemoryError) instead of a dedicated type.
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


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
    """One call of run_training: a new run, or the continuation of a paused or interrupted one (resume=True)."""

    def __init__(self, config: RunConfig, library: Library, control, resume: bool = False):
        super().__init__()
        self.config, self.library, self.control, self.resume = config, library, control, resume

    def work(self):
        from app.core.training import run_training

        return run_training(self.config, self.library, sink=self.event.emit, control=self.control, resume=self.resume)


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
        worker.finished.connect(self._thread.quit)
        worker.finished.connect(worker.deleteLater)
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
