"""What went wrong, in words for the user: the one place exceptions become messages with a suggested fix.

Qt-free, because the training child process (app.gui.training_process) describes its own failures before sending
them to the window. Tracebacks go to the log, never on screen.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from app.core.errors import TailorError
from app.core.precision import is_out_of_memory

log = logging.getLogger("tailor.gui")

USER_ERROR, OUT_OF_MEMORY, DISK_FULL, UNEXPECTED = "user", "out_of_memory", "disk_full", "unexpected"


@dataclass(frozen=True)
class Failure:
    """Why a job failed: a message, what to do about it, and a kind the GUI can offer a remedy for."""

    message: str
    hint: str | None
    kind: str


class ReportedFailure(Exception):
    """A failure already put into words elsewhere (the training child process): passed on as it is."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


def describe_failure(exc: BaseException) -> Failure:
    if isinstance(exc, ReportedFailure):
        return exc.failure
    if isinstance(exc, TailorError):
        return Failure(exc.message, exc.hint, USER_ERROR)
    if is_out_of_memory(exc):
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
