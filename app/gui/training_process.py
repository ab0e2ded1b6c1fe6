"""A training run in a child process, talking to the window in JSON lines.

Why a process and not just a thread: in one process the training shares the GIL with the window, and some of its
work holds the GIL for hundreds of milliseconds at a time (initialising torch's C extension, parsing the dataset,
writing safetensors, the garbage collector after a run). bench/gui_responsiveness.py measured 400-500 ms freezes
that way; with the run in a child the window only reads a pipe. A child also gives memory back for certain when
it ends, which is what Pause promises.

Protocol. The parent writes one JSON line, {"config": RunConfig dict, "library": root, "resume": bool}, then
"pause" or "stop" lines whenever the user asks (end of input means pause: the window is gone). The child writes
one line per core event (app.core.training.event_to_dict), then a last line {"type": "Result", ...} or
{"type": "Failure", ...}.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import asdict
from typing import IO

import psutil

from app.core.config import RunConfig
from app.core.library import Library
from app.core.training import SAMPLE_PROMPTS, TrainingControl, event_to_dict, run_training
from app.gui.failures import Failure, describe_failure

PAUSE, STOP = "pause", "stop"
BACKGROUND_NICENESS = 10
RESULT, FAILURE = "Result", "Failure"


def child_command() -> list[str]:
    """How to start the child: `python -m app`, or the frozen app's own executable (app.gui.main dispatches)."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "--training-process"]
    return [sys.executable, "-m", "app", "--training-process"]


def request_line(config: RunConfig, library: Library, resume: bool) -> str:
    return json.dumps({"config": config.to_dict(), "library": str(library.root), "resume": resume}) + "\n"


def _obey(commands: IO[str], control: TrainingControl) -> None:
    for line in commands:
        if line.strip() == STOP:
            control.request_stop()
        elif line.strip() == PAUSE:
            control.request_pause()
    control.request_pause()  # the window closed or crashed: keep the work, resumable next time


def _yield_cpu_to_the_window() -> None:
    """Run below normal priority: the window (and the rest of the PC) get the CPU first when they need it, and an
    otherwise idle machine still gives the run all of it."""
    process = psutil.Process()
    process.nice(psutil.BELOW_NORMAL_PRIORITY_CLASS if sys.platform == "win32" else BACKGROUND_NICENESS)


def main() -> int:
    _yield_cpu_to_the_window()
    # The protocol gets its own copy of stdout; anything a library prints goes to stderr instead of into the pipe.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    request = json.loads(sys.stdin.readline())
    control = TrainingControl()
    threading.Thread(target=_obey, args=(sys.stdin, control), name="commands", daemon=True).start()
    try:
        result = run_training(RunConfig.from_dict(request["config"]), Library(request["library"]),
                              sink=lambda event: send(event_to_dict(event)), control=control,
                              resume=request["resume"], sample_prompts=SAMPLE_PROMPTS)
    except Exception as exc:  # every failure goes back to the window as words, never as a dead pipe
        send({"type": FAILURE, **asdict(describe_failure(exc))})
        return 1
    send({"type": RESULT, "adapter": result.adapter.name if result.adapter else None, "steps": result.steps,
          "total_steps": result.total_steps, "final_loss": result.final_loss, "paused": result.paused,
          "stopped_early": result.stopped_early})
    return 0


def failure_from_dict(message: dict) -> Failure:
    return Failure(message["message"], message.get("hint"), message["kind"])
