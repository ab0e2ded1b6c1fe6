"""Pieces shared by the command modules: the library from --library, and training with a live progress bar."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from app.core.config import RunConfig
from app.core.library import Library
from app.core.paths import library_home

console = Console()
errors = Console(stderr=True)


def open_library(args) -> Library:
    return Library(library_home(args.library))


@contextmanager
def pause_on_interrupt(control) -> Iterator[None]:
    """First Ctrl-C checkpoints and stops cleanly (resumable with --resume); a second one aborts at once."""

    def handle(signum, frame):
        if control.pause_requested:
            raise KeyboardInterrupt
        errors.print("[yellow]Stopping after this step and saving a checkpoint… (Ctrl-C again to abort)[/]")
        control.request_pause()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def train_with_progress(config: RunConfig, library: Library, resume: bool, show_samples: bool = False):
    """Run a training job in this process with a rich progress bar; returns the TrainingResult."""
    from app.core.training import (
        SAMPLE_PROMPTS, CheckpointEvent, EvalEvent, FinishedEvent, PausedEvent, RecoveryEvent, SampleEvent, StartEvent,
        StatusEvent, StepEvent, TrainingControl, run_training,
    )

    control = TrainingControl()
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
    )
    task = None

    def sink(event) -> None:
        nonlocal task
        if isinstance(event, StatusEvent):
            progress.console.print(f"[dim]{event.message}[/]")
        elif isinstance(event, StartEvent):
            progress.console.print(
                f"Training '{config.name}' on {event.device.upper()}: {event.examples} examples, "
                f"{event.trainable_params:,} trainable parameters, {event.total_steps} steps"
                + (f", {event.heldout_examples} held out for evaluation" if event.heldout_examples else "")
                + (f" (resuming at step {event.start_step})" if event.start_step else ""))
            if event.precision:
                progress.console.print(f"[dim]Computing in {event.precision}.[/]")
            task = progress.add_task(config.name, total=event.total_steps, completed=event.start_step, loss="-", speed="")
        elif isinstance(event, StepEvent) and task is not None:
            progress.update(task, completed=event.step, loss=f"{event.loss:.3f}", speed=f"{event.tokens_per_s:.0f} tok/s")
        elif isinstance(event, EvalEvent):
            progress.console.print(f"Step {event.step}: held-out loss {event.eval_loss:.3f}"
                                   + (" [green](best so far)[/]" if event.best else ""))
        elif isinstance(event, SampleEvent):
            for sample in event.samples:
                progress.console.print(f"  [dim]Q:[/] {escape(sample['prompt'])}\n  [cyan]A:[/] {escape(sample['reply'])}")
        elif isinstance(event, RecoveryEvent):
            progress.console.print(f"[yellow]{event.message}[/]")
        elif isinstance(event, CheckpointEvent):
            progress.console.print(f"[dim]Checkpoint saved at step {event.step}[/]")
        elif isinstance(event, PausedEvent):
            progress.console.print(f"[yellow]Paused at step {event.step}. Continue with the same command plus --resume.[/]")
        elif isinstance(event, FinishedEvent):
            progress.console.print(f"[green]Saved adapter '{event.adapter}'[/] ({event.steps} steps, final loss "
                                   f"{event.final_loss:.3f}) in {event.path}")

    with progress, pause_on_interrupt(control):
        return run_training(config, library, sink, control, resume=resume,
                            sample_prompts=SAMPLE_PROMPTS if show_samples else 0)
