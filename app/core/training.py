"""Run a QLoRA training job from a RunConfig: frozen (4-bit) base, trainable low-rank A/B matrices.

The loop is Tailor's own rather than HF Trainer's because three things matter on a home PC and Trainer makes each
awkward: (1) batches are grouped by length (or packed) so no compute goes to padding, and logits are computed only
where a token is trained, which on small models is a large share of time and memory; (2) a stop, pause or kill -9
must leave a checkpoint the run can resume from, reaching the same final step count; (3) progress goes to a plain
sink function, so the same job drives a rich progress bar, the Qt training panel, or a subprocess pipe.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from app import __version__
from app.core.config import RunConfig
from app.core.data import IGNORE_INDEX, Example, build_report, load_dataset_file, tokenize_dataset
from app.core.errors import TailorError
from app.core.library import (
    LIBRARY_VERSION, MANIFEST_NAME, TRAINING_LOG_NAME, AdapterEntry, Library, write_json_atomic,
)
from app.core.models import ResolvedBase, load_model, load_tokenizer, pick_device, resolve_base

RUN_CONFIG_NAME = "run_config.json"
CHECKPOINT_NAME = "checkpoint"
STATE_NAME = "trainer_state.pt"
PROGRESS_NAME = "progress.json"
# Length-grouping window: sort this many batches' worth of examples by length, so batches hold similar lengths
# while the order stays random at the scale of the whole dataset.
MEGABATCH_FACTOR = 32
MIN_EVENT_INTERVAL_S = 0.1


# Events: small, frozen and JSON-serialisable so the job could move into a subprocess without changing the GUI.

@dataclass(frozen=True)
class StatusEvent:
    message: str


@dataclass(frozen=True)
class StartEvent:
    total_steps: int
    start_step: int
    examples: int
    device: str
    trainable_params: int


@dataclass(frozen=True)
class StepEvent:
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_per_s: float
    """Real (non-padding) tokens per second over the last step."""
    tokens_seen: int
    """Real tokens processed since this session of the run started (a resumed run counts from the resume)."""
    elapsed_s: float
    eta_s: float
    memory_bytes: int
    """Peak CUDA memory on a GPU, the process's resident memory on the CPU."""


@dataclass(frozen=True)
class CheckpointEvent:
    step: int
    path: str


@dataclass(frozen=True)
class FinishedEvent:
    adapter: str
    path: str
    steps: int
    final_loss: float | None
    stopped_early: bool


@dataclass(frozen=True)
class PausedEvent:
    step: int
    checkpoint: str


Event = StatusEvent | StartEvent | StepEvent | CheckpointEvent | FinishedEvent | PausedEvent
Sink = Callable[[Event], None]


_EVENT_TYPES = {cls.__name__: cls for cls in (StatusEvent, StartEvent, StepEvent, CheckpointEvent, FinishedEvent,
                                               PausedEvent)}


def event_to_dict(event: Event) -> dict:
    return {"type": type(event).__name__, **asdict(event)}


def event_from_dict(message: dict) -> Event | None:
    """The event `event_to_dict` described; None for a message that is not an event."""
    kind = _EVENT_TYPES.get(message.get("type"))
    return kind(**{key: value for key, value in message.items() if key != "type"}) if kind else None


class TrainingControl:
    """Thread-safe stop/pause flags the GUI (or a signal handler) sets while the job's loop polls them."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._pause = threading.Event()

    def request_stop(self) -> None:
        """Finish early: the adapter trained so far is saved into the library."""
        self._stop.set()

    def request_pause(self) -> None:
        """Checkpoint and release the model's memory; resuming continues from the checkpoint."""
        self._pause.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def pause_requested(self) -> bool:
        return self._pause.is_set()


@dataclass(frozen=True)
class TrainingResult:
    adapter: AdapterEntry | None
    """The published adapter; None when the run was paused."""
    steps: int
    total_steps: int
    final_loss: float | None
    paused: bool
    stopped_early: bool


def group_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Random batches of similar-length examples; deterministic in (seed, epoch) so a resumed run sees the same order."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * MEGABATCH_FACTOR
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int, packing: bool):
    """Padded rows (length-grouped, so little padding) or one packed row whose position ids restart per example."""
    import torch

    if packing:
        ids = [t for e in examples for t in e.input_ids]
        labels = []
        for example in examples:
            # The first token of each example must not be predicted from the previous example's last token.
            labels += [IGNORE_INDEX] + example.labels[1:]
        positions = [p for e in examples for p in range(len(e.input_ids))]
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]), "attention_mask": None}
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": None}


def trained_token_loss(model, batch: dict, device: str):
    """Summed cross-entropy over trained tokens only, and their count.

    Running the decoder and applying the output head only at positions that carry a label avoids building the full
    batch x length x vocab logits tensor, which for a 49k-token vocabulary is most of a small model's memory.
    """
    import torch
    import torch.nn.functional as F

    base = model.get_base_model()
    labels = batch["labels"].to(device)
    kwargs = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
    if batch["attention_mask"] is not None:
        kwargs["attention_mask"] = batch["attention_mask"].to(device)
    if batch["position_ids"] is not None:
        kwargs["position_ids"] = batch["position_ids"].to(device)
    hidden = base.get_decoder()(**kwargs).last_hidden_state
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][selected]).float()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets[selected], reduction="sum"), int(selected.sum())


def _memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    import psutil

    return psutil.Process().memory_info().rss


def _lora_config(config: RunConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.peft_target_modules(),
        use_dora=config.lora.use_dora,
        use_rslora=config.lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _save_checkpoint(run_dir: Path, model, state: dict) -> Path:
    """Replace the run's checkpoint atomically: a kill at any moment leaves the previous or the new one whole."""
    import torch

    staging = run_dir / f".{CHECKPOINT_NAME}.new"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    torch.save(state, staging / STATE_NAME)
    # Readable without torch, so the GUI can offer "resume at step 40 of 100" instantly.
    write_json_atomic(staging / PROGRESS_NAME, {"step": state["step"], "total_steps": state["total_steps"]})
    target, previous = run_dir / CHECKPOINT_NAME, run_dir / f".{CHECKPOINT_NAME}.old"
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def _find_checkpoint(run_dir: Path) -> Path | None:
    for candidate in (run_dir / CHECKPOINT_NAME, run_dir / f".{CHECKPOINT_NAME}.old"):
        if (candidate / STATE_NAME).is_file():
            return candidate
    return None


def check_run_name(config: RunConfig, library: Library, resume: bool) -> RunConfig:
    """The config this run uses: the saved one when resuming. Errors here are the user's to fix (exit 2)."""
    saved = library.run_dir(config.name) / RUN_CONFIG_NAME
    if resume:
        if not saved.is_file():
            raise TailorError(f"There is no interrupted run of '{config.name}' to resume.",
                              "Start it without --resume." + _interrupted_hint(library))
        return interrupted_run_config(library, config.name)
    if saved.is_file():
        raise TailorError(f"'{config.name}' has an interrupted run.",
                          "Add --resume to continue it, or pick another --name.")
    if library.exists(config.name):
        raise TailorError(f"An adapter named '{config.name}' already exists in the library.",
                          "Pick another --name, or delete it first: tailor adapters delete NAME")
    return config


def _claim_run_dir(config: RunConfig, library: Library) -> Path:
    """Record the run only once its inputs proved usable, so a typo never leaves an 'interrupted run' behind."""
    library.ensure()
    run_dir = library.run_dir(config.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN_CONFIG_NAME, config.to_dict())
    return run_dir


def interrupted_run_config(library: Library, name: str) -> RunConfig:
    """The config an interrupted run started with, which `run_training(..., resume=True)` continues."""
    saved = library.run_dir(name) / RUN_CONFIG_NAME
    if not saved.is_file():
        raise TailorError(f"There is no interrupted run of '{name}'.")
    return RunConfig.from_json(saved.read_text())


def interrupted_run_progress(library: Library, name: str) -> tuple[int, int | None]:
    """(step reached, total steps) of an interrupted run's last checkpoint; (0, None) if killed before the first."""
    checkpoint = _find_checkpoint(library.run_dir(name))
    if checkpoint is None or not (checkpoint / PROGRESS_NAME).is_file():
        return 0, None
    progress = json.loads((checkpoint / PROGRESS_NAME).read_text())
    return int(progress["step"]), int(progress["total_steps"])


def discard_interrupted_run(library: Library, name: str) -> None:
    shutil.rmtree(library.run_dir(name), ignore_errors=True)


def _interrupted_hint(library: Library) -> str:
    runs = library.interrupted_runs()
    return f" Interrupted runs: {', '.join(runs)}." if runs else ""


def run_training(config: RunConfig, library: Library, sink: Sink = lambda event: None,
                 control: TrainingControl | None = None, resume: bool = False) -> TrainingResult:
    import torch
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import get_scheduler

    control = control or TrainingControl()
    config = check_run_name(config, library, resume)
    run_dir = library.run_dir(config.name)
    checkpoint = _find_checkpoint(run_dir) if resume else None

    sink(StatusEvent("Preparing the base model…"))
    resolved = resolve_base(config.model.base, progress=lambda message: sink(StatusEvent(message)))
    tokenizer = load_tokenizer(resolved.folder, config.model.trust_remote_code)
    sink(StatusEvent("Reading the dataset…"))
    loaded = load_dataset_file(config.data.path, config.data.format, config.data.prompt_column, config.data.response_column)
    examples, lengths = tokenize_dataset(tokenizer, loaded, config.data.max_len, config.system_prompt)
    report = build_report(loaded, lengths, len(examples), config.data.max_len)
    if not examples:
        raise TailorError(f"No example in {loaded.path.name} keeps an assistant reply within {config.data.max_len} tokens.",
                          "Raise the max length.")
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_NAME, weights_only=False)
        if state["dataset_fingerprint"] != report.fingerprint:
            raise TailorError(f"The dataset {loaded.path} changed since the run started, so it cannot be resumed.",
                              "Restore the original file, or delete the run folder and start again: " + str(run_dir))
    else:
        state = None
    if not resume:
        _claim_run_dir(config, library)

    device = pick_device()
    torch.manual_seed(config.training.seed)
    sink(StatusEvent(f"Loading the base model ({config.model.quant}) on {device.upper()}…"))
    base = load_model(resolved.folder, config.model.quant, device, config.model.trust_remote_code)
    if config.training.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, _lora_config(config))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.training.learning_rate, weight_decay=config.training.weight_decay)

    training = config.training
    batches_per_epoch = training.batches_per_epoch(len(examples))
    steps_per_epoch = training.steps_per_epoch(len(examples))
    total_steps = training.planned_steps(len(examples))
    scheduler = get_scheduler(training.lr_schedule, optimizer, num_warmup_steps=int(training.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    step, history = 0, []
    if state is not None:
        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step, history = state["step"], state["history"]

    example_lengths = [len(e.input_ids) for e in examples]
    pad_id = tokenizer.pad_token_id
    sink(StartEvent(total_steps, step, len(examples), device, sum(p.numel() for p in trainable)))
    model.train()
    started, last_event, steps_this_session, tokens_seen = time.monotonic(), 0.0, 0, 0
    prior_elapsed = state["elapsed_s"] if state else 0.0

    def checkpoint_state() -> dict:
        return {"step": step, "total_steps": total_steps, "history": history, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "dataset_fingerprint": report.fingerprint,
                "elapsed_s": prior_elapsed + time.monotonic() - started}

    batch_cache: dict[int, list[list[int]]] = {}
    while step < total_steps and not control.stop_requested and not control.pause_requested:
        step_started = time.monotonic()
        micro_batches = []
        for micro in range(step * training.grad_accum, (step + 1) * training.grad_accum):
            epoch, position = divmod(micro, batches_per_epoch)
            if micro_batches and position == 0:
                break  # an optimizer step never straddles two epochs
            if epoch not in batch_cache:
                batch_cache = {epoch: group_batches(example_lengths, training.batch_size, training.seed, epoch)}
            micro_batches.append(batch_cache[epoch][position])
        collated = [collate([examples[i] for i in indices], pad_id, config.data.packing) for indices in micro_batches]
        step_tokens = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in collated)
        real_tokens = sum(len(examples[i].input_ids) for indices in micro_batches for i in indices)
        loss_total = 0.0
        for batch in collated:
            loss_sum, _ = trained_token_loss(model, batch, device)
            (loss_sum / step_tokens).backward()
            loss_total += float(loss_sum.detach())
        torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_this_session += 1
        tokens_seen += real_tokens
        loss = loss_total / step_tokens
        learning_rate = scheduler.get_last_lr()[0]
        history.append({"step": step, "loss": loss, "lr": learning_rate})

        now = time.monotonic()
        if now - last_event >= MIN_EVENT_INTERVAL_S or step == total_steps:
            last_event = now
            seconds_per_step = (now - started) / steps_this_session
            sink(StepEvent(step=step, total_steps=total_steps, epoch=step / steps_per_epoch, loss=loss,
                           learning_rate=learning_rate, tokens_per_s=real_tokens / max(now - step_started, 1e-9), tokens_seen=tokens_seen,
                           elapsed_s=prior_elapsed + now - started, eta_s=seconds_per_step * (total_steps - step),
                           memory_bytes=_memory_bytes(device)))
        if step % training.checkpoint_every == 0 and step < total_steps:
            sink(CheckpointEvent(step, str(_save_checkpoint(run_dir, model, checkpoint_state()))))

    final_loss = history[-1]["loss"] if history else None
    if control.pause_requested and step < total_steps:
        saved = _save_checkpoint(run_dir, model, checkpoint_state())
        del model, base, optimizer, trainable
        _free_memory(device)
        sink(PausedEvent(step, str(saved)))
        return TrainingResult(None, step, total_steps, final_loss, paused=True, stopped_early=False)

    sink(StatusEvent("Saving the adapter…"))
    entry = _publish_adapter(library, config, model, resolved, report, history, step, total_steps)
    shutil.rmtree(run_dir, ignore_errors=True)
    stopped_early = step < total_steps
    del model, base, optimizer, trainable
    _free_memory(device)
    sink(FinishedEvent(entry.name, str(entry.path), step, final_loss, stopped_early))
    return TrainingResult(entry, step, total_steps, final_loss, paused=False, stopped_early=stopped_early)


def _publish_adapter(library: Library, config: RunConfig, model, resolved: ResolvedBase, report, history: list[dict],
                     steps: int, total_steps: int) -> AdapterEntry:
    """Write the PEFT folder and manifest into staging, then rename it into the library in one step."""
    with library.staging() as staged:
        model.save_pretrained(staged)
        adapter_config = json.loads((staged / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = resolved.model_id
        write_json_atomic(staged / "adapter_config.json", adapter_config)
        manifest = {
            "library_version": LIBRARY_VERSION,
            "tailor_version": __version__,
            "name": config.name,
            "kind": "trained",
            "system_prompt": config.system_prompt,
            "base_model": {"id": resolved.model_id, "source": config.model.base, "fingerprint": resolved.fingerprint(),
                           "architecture": resolved.config().get("model_type")},
            "dataset": {"path": report.path, "fingerprint": report.fingerprint, "rows": report.rows,
                        "usable_rows": report.usable_rows, "format": report.format},
            "config": config.to_dict(),
            "final_loss": history[-1]["loss"] if history else None,
            "steps": steps,
            "planned_steps": total_steps,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(staged / MANIFEST_NAME, manifest)
        write_json_atomic(staged / TRAINING_LOG_NAME, history)
        return library.publish(staged, config.name)


def _free_memory(device: str) -> None:
    """Give the memory back now rather than whenever the garbage collector runs: pause means free the GPU."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
