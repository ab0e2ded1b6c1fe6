"""Run a QLoRA training job from a RunConfig: frozen (4-bit) base, trainable low-rank A/B matrices.

The loop is Tailor's own rather than HF Trainer's because four things matter on a home PC and Trainer makes each
awkward: (1) batches are grouped by length (or packed) so no compute goes to padding, and logits are computed only
where a token is trained, which on small models is a large share of time and memory; (2) a stop, pause or kill -9
must leave a checkpoint the run resumes from to the same adapter the uninterrupted run would have made; (3) running
out of memory halves the micro-batch and carries on, training the very same examples per step; (4) progress goes to
a plain sink function, so the same job drives a rich progress bar, the Qt training panel, or a subprocess pipe.

Shaped like a torchtune recipe: `TrainingRun.setup` builds data, model, optimizer and resume state; `train_step`,
`evaluate`, `save_checkpoint` and `publish` are the named points features plug into; `run_training` is the loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from app import __version__
from app.core.adalora import budget_state, orthogonal_penalty, restore_budget_state, save_as_lora
from app.core.attention import attention_for_batch
from app.core.batches import StepPlan, collate, split_micro_batches, trained_tokens
from app.core.catalogue import ModelShape
from app.core.cpu_memory import return_freed_memory_to_os
from app.core.estimate import MemoryPlan, memory_plan_for_run
from app.core.config import RunConfig
from app.core.data import IGNORE_INDEX, DatasetReport, Example, LoadedDataset, build_report, load_dataset_file, tokenize_dataset
from app.core.diskspace import disk_space_errors, require_free_space
from app.core.gpu import DeviceIdentity, torch_device_identity
from app.core.errors import TailorError
from app.core.heldout import prompts_of, split_rows, write_heldout
from app.core.library import (
    LIBRARY_VERSION, MANIFEST_NAME, TRAINING_LOG_NAME, AdapterEntry, Library, write_json_atomic,
)
from app.core.models import ResolvedBase, load_model, load_tokenizer, pick_device, resolve_base
from app.core.fused_lora import fuse_lora_layers
from app.core.loss import head_cross_entropy
from app.core.peft_setup import wrap_base
from app.core.precision import OomSimulator, compute_dtype, is_out_of_memory

RUN_CONFIG_NAME = "run_config.json"
CHECKPOINT_NAME = "checkpoint"
STATE_NAME = "trainer_state.pt"
PROGRESS_NAME = "progress.json"
BEST_NAME = "best_adapter.safetensors"
MIN_EVENT_INTERVAL_S = 0.1
MAX_OOM_RECOVERIES = 2
SAMPLE_PROMPTS = 2
SAMPLE_TOKENS = 48


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
    heldout_examples: int = 0
    """Examples kept out of training to measure the eval loss on (0: no evaluation)."""
    precision: str = ""
    """What the run computes in, and why, in plain words."""
    gpu_uuid: str | None = None
    """The CUDA device the run trains on, as torch names it in the training process (None on the CPU): the GPU
    strip marks that GPU, whatever CUDA_VISIBLE_DEVICES or NVML's numbering say in the window's process."""
    gpu_pci_bus_id: str | None = None

    @property
    def gpu(self) -> DeviceIdentity | None:
        return DeviceIdentity(self.gpu_uuid, self.gpu_pci_bus_id) if self.gpu_uuid or self.gpu_pci_bus_id else None


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
class EvalEvent:
    step: int
    eval_loss: float
    """Mean loss per trained token of the held-out examples."""
    best: bool
    """This is the lowest eval loss so far (the checkpoint `--keep best` would publish)."""


@dataclass(frozen=True)
class SampleEvent:
    step: int
    samples: list
    """[{"prompt": the last user message, "reply": the persona's greedy reply now}, ...]"""


@dataclass(frozen=True)
class RecoveryEvent:
    step: int
    micro_batch_size: int
    grad_accum: int
    message: str


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


Event = (StatusEvent | StartEvent | StepEvent | EvalEvent | SampleEvent | RecoveryEvent | CheckpointEvent
         | FinishedEvent | PausedEvent)
Sink = Callable[[Event], None]


_EVENT_TYPES = {cls.__name__: cls for cls in (StatusEvent, StartEvent, StepEvent, EvalEvent, SampleEvent,
                                               RecoveryEvent, CheckpointEvent, FinishedEvent, PausedEvent)}


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

    @property
    def interrupted(self) -> bool:
        return self.stop_requested or self.pause_requested


@dataclass(frozen=True)
class TrainingResult:
    adapter: AdapterEntry | None
    """The published adapter; None when the run was paused."""
    steps: int
    total_steps: int
    final_loss: float | None
    paused: bool
    stopped_early: bool


def trained_token_loss(model, batch: dict, device: str):
    """Summed cross-entropy over trained tokens only, and their count.

    Running the decoder and applying the output head only at positions that carry a label avoids building the full
    batch x length x vocab logits tensor, which for a 49k-token vocabulary is most of a small model's memory; the loss
    itself then runs a slice of tokens at a time (app.core.loss).
    """
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
    loss = head_cross_entropy(base.get_output_embeddings(), hidden[:, :-1][selected], targets[selected],
                              getattr(base.config, "final_logit_softcapping", None))
    return loss, int(selected.sum())


# Setup pieces


@dataclass
class RunData:
    """The tokenised dataset of a run, split into what it trains on and what it measures on."""

    tokenizer: object
    train: list[Example]
    heldout: list[Example]
    heldout_rows: LoadedDataset | None
    """The held-out conversations as read (for sample replies and the report card)."""
    report: DatasetReport

    @property
    def lengths(self) -> list[int]:
        return [len(example.input_ids) for example in self.train]


def prepare_data(config: RunConfig, resolved: ResolvedBase, sink: Sink) -> RunData:
    """Read, split and tokenise the dataset; errors here are the user's to fix, so nothing is recorded yet."""
    tokenizer = load_tokenizer(resolved.folder, config.model.trust_remote_code)
    sink(StatusEvent("Reading the dataset…"))
    data = config.data
    loaded = load_dataset_file(data.path, data.format, data.prompt_column, data.response_column)
    if data.eval_path:
        train_rows = loaded
        heldout_rows = load_dataset_file(data.eval_path, data.format, data.prompt_column, data.response_column)
    else:
        train_rows, heldout_rows = split_rows(loaded, data.eval_split, config.training.seed)
    examples, lengths = tokenize_dataset(tokenizer, train_rows, data.max_len, config.system_prompt)
    heldout = tokenize_dataset(tokenizer, heldout_rows, data.max_len, config.system_prompt)[0] if heldout_rows else []
    report = build_report(loaded, lengths, len(examples), data.max_len)
    if not examples:
        raise TailorError(f"No example in {loaded.path.name} keeps an assistant reply within {data.max_len} tokens.",
                          "Raise the max length.")
    return RunData(tokenizer, examples, heldout, heldout_rows if heldout else None, report)


def _model_shape(resolved: ResolvedBase, trust_remote_code: bool) -> ModelShape:
    from transformers import AutoConfig

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(resolved.folder, trust_remote_code=trust_remote_code))


def _memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    import psutil

    return psutil.Process().memory_info().rss


def _free_memory(device: str) -> None:
    """Give the memory back now rather than whenever the garbage collector runs: pause means free the GPU."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _rng_state(device: str) -> dict:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunProgress:
    """Everything about a run's progress a checkpoint keeps besides the adapter, optimizer and RNG."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    micro_batch_size: int = 1
    """Examples per forward pass now: the configured batch size, halved by each out-of-memory recovery."""
    gradient_checkpointing: bool = True
    """Whether activations are recomputed now: as planned, or turned on by an out-of-memory recovery."""
    checkpoint_every_n_layers: int = 1
    """With checkpointing: every n-th block recomputes; an out-of-memory recovery makes it every block (1)."""
    recoveries: list[dict] = field(default_factory=list)
    best_eval: dict | None = None
    """{"step": s, "eval_loss": x} of the lowest held-out loss so far; its adapter is in the run's BEST_NAME file."""
    elapsed_s: float = 0.0


class TrainingRun:
    """One run's live state — model, optimizer, schedule, step plan, progress — and the steps that move it on."""

    def __init__(self, config: RunConfig, library: Library, sink: Sink, resolved: ResolvedBase, data: RunData,
                 plan: MemoryPlan):
        import torch
        from transformers import get_scheduler

        self.config, self.library, self.sink, self.resolved, self.data = config, library, sink, resolved, data
        self.run_dir = library.run_dir(config.name)
        training = config.training
        self.device = pick_device()
        self.precision = compute_dtype(self.device)
        torch.manual_seed(training.seed)
        self.memory_plan = plan
        sink(StatusEvent(f"Loading the base model ({plan.reason}) on {self.device.upper()}…"))
        base = load_model(resolved.folder, plan.quant, self.device, config.model.trust_remote_code,
                          dtype=self.precision.dtype, return_freed_memory=plan.return_freed_memory)
        self.total_steps = training.planned_steps(len(data.train))
        self.adalora = config.lora.method == "adalora"
        self.model = wrap_base(base, config, self.total_steps)
        fuse_lora_layers(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=training.learning_rate, weight_decay=training.weight_decay)
        self.scheduler = get_scheduler(training.lr_schedule, self.optimizer,
                                       num_warmup_steps=training.warmup_steps(self.total_steps),
                                       num_training_steps=self.total_steps)
        # fp16 (GPUs without native bf16) underflows small gradients unless the loss is scaled.
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.needs_grad_scaler else None
        self.plan = StepPlan(data.lengths, training.examples_per_step, training.seed)
        self.eval_every = training.eval_interval(self.total_steps)
        self.progress = RunProgress(micro_batch_size=training.batch_size, gradient_checkpointing=False)
        if training.gradient_checkpointing:
            self._checkpoint_activations(training.checkpoint_every_n_layers)
        self.oom_simulator = OomSimulator()
        self._in_optimizer_update = False

    # Named points of the recipe

    def train_step(self) -> dict:
        """One optimizer step over the plan's examples for it, in micro-batches; returns its log entry."""
        indices = self.plan.examples_for(self.progress.step)
        micro = split_micro_batches(indices, self.plan.lengths, self.progress.micro_batch_size)
        batches = [collate([self.data.train[i] for i in chunk], self.data.tokenizer.pad_token_id,
                           self.config.data.packing) for chunk in micro]
        step_tokens = sum(trained_tokens(batch) for batch in batches)
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self.oom_simulator.check(self.progress.step + 1)
        loss_total = 0.0
        for index, batch in enumerate(batches):
            with attention_for_batch(self.model, self.device, batch["input_ids"].shape[1]):
                with self._autocast():
                    loss_sum, _ = trained_token_loss(self.model, batch, self.device)
                # Normalised by the whole step's trained tokens, so the gradient is the same however it is split.
                loss = loss_sum / step_tokens
                if self.adalora and index == 0:
                    loss = loss + orthogonal_penalty(self.model)  # once per step, as peft adds it once per forward
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_total += float(loss_sum.detach())
        self._optimizer_step()
        self.progress.step += 1
        entry = {"step": self.progress.step, "epoch": self.plan.epoch_of(self.progress.step - 1) + 1,
                 "loss": loss_total / step_tokens, "lr": learning_rate, "examples": len(indices), "tokens": step_tokens,
                 "real_tokens": sum(self.plan.lengths[i] for i in indices)}
        self.progress.history.append(entry)
        return entry

    def evaluate(self) -> float:
        """Mean loss per trained token over the held-out examples; records it and keeps the best adapter."""
        import torch

        self.model.eval()
        total, tokens = 0.0, 0
        lengths = [len(example.input_ids) for example in self.data.heldout]
        with torch.no_grad():
            for chunk in split_micro_batches(range(len(self.data.heldout)), lengths, self.progress.micro_batch_size):
                batch = collate([self.data.heldout[i] for i in chunk], self.data.tokenizer.pad_token_id, False)
                with self._autocast():
                    loss_sum, count = trained_token_loss(self.model, batch, self.device)
                total, tokens = total + float(loss_sum), tokens + count
        self.model.train()
        eval_loss = total / max(tokens, 1)
        self.progress.history[-1]["eval_loss"] = eval_loss
        best = self.progress.best_eval is None or eval_loss < self.progress.best_eval["eval_loss"]
        if best:
            self._save_best(eval_loss)
        self.sink(EvalEvent(self.progress.step, eval_loss, best))
        return eval_loss

    def sample_replies(self, count: int) -> list[dict]:
        """The persona's short greedy replies to a few held-out prompts, as it is right now."""
        import torch

        from app.core.data import with_system_prompt

        samples = []
        self.model.eval()
        with torch.no_grad():
            for messages in prompts_of(self.data.heldout_rows, count):
                text = self.data.tokenizer.apply_chat_template(with_system_prompt(messages, self.config.system_prompt),
                                                               tokenize=False, add_generation_prompt=True)
                ids = self.data.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
                with self._autocast():
                    output = self.model.generate(**ids, max_new_tokens=SAMPLE_TOKENS, do_sample=False, use_cache=True,
                                                 pad_token_id=self.data.tokenizer.pad_token_id)
                reply = self.data.tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
                samples.append({"prompt": messages[-1]["content"], "reply": reply.strip()})
        self.model.train()
        self.sink(SampleEvent(self.progress.step, samples))
        return samples

    def save_checkpoint(self) -> Path:
        """Replace the run's checkpoint atomically: a kill at any moment leaves the previous or the new one whole."""
        import torch

        staging = self.run_dir / f".{CHECKPOINT_NAME}.new"
        shutil.rmtree(staging, ignore_errors=True)
        # The adapter, and AdamW's two moments of it, plus the state's small change.
        needed = 3 * sum(p.numel() * p.element_size() for p in self.trainable)
        try:
            with disk_space_errors(self.run_dir, "save a checkpoint", needed):
                require_free_space(self.run_dir, needed, "save a checkpoint")
                self.model.save_pretrained(staging)
                torch.save(self._state(), staging / STATE_NAME)
                # Readable without torch, so the GUI can offer "resume at step 40 of 100" instantly.
                write_json_atomic(staging / PROGRESS_NAME, {"step": self.progress.step, "total_steps": self.total_steps})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # the previous checkpoint stays whole and resumable
            raise
        target, previous = self.run_dir / CHECKPOINT_NAME, self.run_dir / f".{CHECKPOINT_NAME}.old"
        shutil.rmtree(previous, ignore_errors=True)
        if target.exists():
            os.replace(target, previous)
        os.replace(staging, target)
        shutil.rmtree(previous, ignore_errors=True)
        return target

    def restore(self, checkpoint: Path) -> None:
        """Continue from a checkpoint: adapter, optimizer, schedule, RNG and progress as they were at its step."""
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = torch.load(checkpoint / STATE_NAME, weights_only=True)
        if state["dataset_fingerprint"] != self.data.report.fingerprint:
            raise TailorError(f"The dataset {self.data.report.path} changed since the run started, so it cannot be "
                              "resumed.", "Restore the original file, or delete the run folder and start again: "
                              + str(self.run_dir))
        if self.adalora:
            restore_budget_state(self.model, state["adalora"])  # peft's own save drops the pruned ranks' rows
        else:
            set_peft_model_state_dict(self.model, load_file(checkpoint / "adapter_model.safetensors",
                                                            device=self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _restore_rng_state(state["rng"])
        self.progress = RunProgress(**state["progress"])
        if self.progress.gradient_checkpointing:
            self._checkpoint_activations(self.progress.checkpoint_every_n_layers)

    def recover_from_out_of_memory(self, error: BaseException) -> None:
        """Halve the micro-batch (doubling accumulation, so each step trains the same examples), checkpoint every
        block if it did not, and go on.

        A failure in the forward or backward pass leaves the adapter and optimizer exactly as they were at the start
        of the step, so the step is simply retried: no work is lost. A failure inside the optimizer update may have
        changed some weights, so the run goes back to its last checkpoint.
        """
        failed_step = self.progress.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        _free_memory(self.device)
        if self.device == "cpu":
            return_freed_memory_to_os()  # from here on the run keeps to its live tensors
        every_block = self.progress.gradient_checkpointing and self.progress.checkpoint_every_n_layers == 1
        nothing_left = self.progress.micro_batch_size == 1 and every_block
        if len(self.progress.recoveries) >= MAX_OOM_RECOVERIES or nothing_left:
            raise TailorError(
                f"Training ran out of memory at step {failed_step} even with {self.progress.micro_batch_size} "
                f"example(s) per pass, after {len(self.progress.recoveries)} automatic retr"
                f"{'y' if len(self.progress.recoveries) == 1 else 'ies'} with smaller batches.",
                "Use less memory per example: a shorter max length (--max-len), a smaller rank (--rank), "
                "4-bit quantisation (--quant 4bit) and gradient checkpointing; or close other programs using the "
                "GPU. Your progress is kept: the last checkpoint resumes with --resume.") from error
        lost_steps = 0
        if self._in_optimizer_update:
            self._in_optimizer_update = False
            checkpoint = _find_checkpoint(self.run_dir)
            recoveries = self.progress.recoveries
            self.restore(checkpoint)
            self.progress.recoveries = recoveries
            lost_steps = failed_step - 1 - self.progress.step
        can_halve = self.progress.micro_batch_size > 1
        changes = []
        if not every_block:
            self._checkpoint_activations(every_n_layers=1)
            changes.append("gradient checkpointing on every block")
        if can_halve:
            self.progress.micro_batch_size = math.ceil(self.progress.micro_batch_size / 2)
        accumulation = math.ceil(self.config.training.examples_per_step / self.progress.micro_batch_size)
        if can_halve:
            changes.append(f"{self.progress.micro_batch_size} example(s) per pass x {accumulation} accumulated, the "
                           "same examples per step")
        retry = "with " + (" and ".join(changes) or "the same settings, from the checkpoint")
        record = {"step": failed_step, "micro_batch_size": self.progress.micro_batch_size, "grad_accum": accumulation,
                  "gradient_checkpointing": True, "checkpoint_every_n_layers": 1, "lost_steps": lost_steps,
                  "error": str(error).splitlines()[0][:200] if str(error) else type(error).__name__}
        self.progress.recoveries.append(record)
        lost = f" and went back {lost_steps} step(s) to the last checkpoint" if lost_steps else " (no work lost)"
        self.sink(RecoveryEvent(failed_step, self.progress.micro_batch_size, accumulation,
                                f"Ran out of memory at step {failed_step}; retrying {retry}{lost}."))

    def _checkpoint_activations(self, every_n_layers: int) -> None:
        self.model.get_base_model().activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n_layers)
        self.progress.gradient_checkpointing = True
        self.progress.checkpoint_every_n_layers = every_n_layers

    def publish(self) -> AdapterEntry:
        """Write the PEFT folder and manifest into staging, then rename it into the library in one step."""
        from safetensors.torch import load_file

        config, progress = self.config, self.progress
        kept_step = progress.step
        best = progress.best_eval
        if config.training.keep == "best" and best and best["step"] != progress.step:
            self._load_trainable(load_file(self.run_dir / BEST_NAME, device=self.device))
            kept_step = best["step"]
        report = self.data.report
        with self.library.staging() as staged:
            if self.adalora:
                save_as_lora(self.model, staged)  # shareable: plain LoRA, pruned ranks dropped, E folded into A
            else:
                self.model.save_pretrained(staged)
            adapter_config = json.loads((staged / "adapter_config.json").read_text())
            adapter_config["base_model_name_or_path"] = self.resolved.model_id
            write_json_atomic(staged / "adapter_config.json", adapter_config)
            write_heldout(staged, self.data.heldout_rows)
            manifest = {
                "library_version": LIBRARY_VERSION,
                "tailor_version": __version__,
                "name": config.name,
                "kind": "trained",
                "system_prompt": config.system_prompt,
                "base_model": {"id": self.resolved.model_id, "source": config.model.base,
                               "fingerprint": self.resolved.fingerprint(),
                               "architecture": self.resolved.config().get("model_type")},
                "dataset": {"path": report.path, "fingerprint": report.fingerprint, "rows": report.rows,
                            "usable_rows": report.usable_rows, "format": report.format,
                            "trained_examples": len(self.data.train), "heldout_examples": len(self.data.heldout)},
                "config": config.to_dict(),
                "final_loss": progress.history[-1]["loss"] if progress.history else None,
                "eval_loss": _eval_loss_at(progress.history, kept_step),
                "kept_step": kept_step,
                "steps": progress.step,
                "planned_steps": self.total_steps,
                "precision": self.precision.reason,
                "quant": self.memory_plan.quant,
                "quant_reason": self.memory_plan.reason,
                "oom_recoveries": progress.recoveries,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_json_atomic(staged / MANIFEST_NAME, manifest)
            write_json_atomic(staged / TRAINING_LOG_NAME, progress.history)
            return self.library.publish(staged, config.name)

    def _load_trainable(self, tensors: dict) -> None:
        import torch

        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                parameters[name].copy_(tensor)

    def release(self) -> None:
        del self.model, self.optimizer, self.trainable
        _free_memory(self.device)

    # Helpers

    @property
    def finished(self) -> bool:
        return self.progress.step >= self.total_steps

    def eval_due(self) -> bool:
        return bool(self.data.heldout) and (self.progress.step % self.eval_every == 0 or self.finished)

    def checkpoint_due(self) -> bool:
        return self.progress.step % self.config.training.checkpoint_every == 0 and not self.finished

    def step_event(self, entry: dict, step_seconds: float, steps_this_session: int, tokens_seen: int,
                   session_started: float) -> StepEvent:
        now = time.monotonic()
        return StepEvent(step=entry["step"], total_steps=self.total_steps,
                         epoch=entry["step"] / self.plan.steps_per_epoch, loss=entry["loss"],
                         learning_rate=entry["lr"], tokens_per_s=entry["real_tokens"] / max(step_seconds, 1e-9),
                         tokens_seen=tokens_seen, elapsed_s=self.progress.elapsed_s,
                         eta_s=(now - session_started) / steps_this_session * (self.total_steps - entry["step"]),
                         memory_bytes=_memory_bytes(self.device))

    def _autocast(self):
        import torch

        return torch.autocast("cuda", dtype=torch.float16) if self.scaler else nullcontext()

    def _optimizer_step(self) -> None:
        import torch

        self._in_optimizer_update = True
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.training.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.adalora:
            # Scores each rank by its weights' gradients (still there before zero_grad) and prunes on schedule.
            self.model.base_model.update_and_allocate(self.progress.step + 1)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._in_optimizer_update = False

    def _state(self) -> dict:
        """Only tensors and plain data, so resuming can load it with torch.load(weights_only=True)."""
        return {"progress": asdict(self.progress), "total_steps": self.total_steps,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "rng": _rng_state(self.device),
                "dataset_fingerprint": self.data.report.fingerprint,
                "adalora": budget_state(self.model) if self.adalora else None}

    def _save_best(self, eval_loss: float) -> None:
        """The adapter's trainable tensors at full size by parameter name (AdaLoRA's pruned rows included)."""
        from safetensors.torch import save_file

        staging = self.run_dir / f".{BEST_NAME}.new"
        try:
            with disk_space_errors(self.run_dir, "keep the best adapter so far"):
                save_file({name: parameter.detach().cpu().contiguous()
                           for name, parameter in self.model.named_parameters() if parameter.requires_grad}, staging)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        os.replace(staging, self.run_dir / BEST_NAME)
        self.progress.best_eval = {"step": self.progress.step, "eval_loss": eval_loss}


def _eval_loss_at(history: list[dict], step: int) -> float | None:
    return next((entry.get("eval_loss") for entry in history if entry["step"] == step), None)


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
    try:
        progress = json.loads((checkpoint / PROGRESS_NAME).read_text()) if checkpoint else None
    except (OSError, ValueError):  # a live run swapped its checkpoint in between: as good as none yet
        progress = None
    if not isinstance(progress, dict):
        return 0, None
    return int(progress["step"]), int(progress["total_steps"])


def discard_interrupted_run(library: Library, name: str) -> None:
    shutil.rmtree(library.run_dir(name), ignore_errors=True)


def _interrupted_hint(library: Library) -> str:
    runs = library.interrupted_runs()
    return f" Interrupted runs: {', '.join(runs)}." if runs else ""


def setup(config: RunConfig, library: Library, sink: Sink, resume: bool) -> TrainingRun:
    """Model, data, optimizer and, when resuming, the state the interrupted run reached."""
    sink(StatusEvent("Preparing the base model…"))
    resolved = resolve_base(config.model.base, progress=lambda message: sink(StatusEvent(message)))
    data = prepare_data(config, resolved, sink)
    checkpoint = _find_checkpoint(library.run_dir(config.name)) if resume else None
    # 'auto' is decided once, from the memory free now, and recorded: a resumed run trains the same way.
    plan = memory_plan_for_run(config, _model_shape(resolved, config.model.trust_remote_code), pick_device(),
                               longest_example=max(data.lengths, default=None))
    if resume:
        plan = dataclasses.replace(plan, reason="as chosen when the run started")
    else:
        config = config.replace(model=dataclasses.replace(config.model, quant=plan.quant),
                                training=dataclasses.replace(
                                    config.training, gradient_checkpointing=plan.gradient_checkpointing,
                                    checkpoint_every_n_layers=plan.checkpoint_every_n_layers))
        _claim_run_dir(config, library)
    run = TrainingRun(config, library, sink, resolved, data, plan)
    if checkpoint is not None:
        run.restore(checkpoint)
    else:
        # Step 0 is a checkpoint too, so an out-of-memory failure inside the very first updates has one to go back to.
        run.save_checkpoint()
    return run


def run_training(config: RunConfig, library: Library, sink: Sink = lambda event: None,
                 control: TrainingControl | None = None, resume: bool = False,
                 sample_prompts: int = 0) -> TrainingResult:
    """Train `config` into the library; `sample_prompts` held-out prompts are answered at each evaluation."""
    control = control or TrainingControl()
    config = check_run_name(config, library, resume)
    run = setup(config, library, sink, resume)
    gpu = torch_device_identity() if run.device == "cuda" else DeviceIdentity()
    sink(StartEvent(run.total_steps, run.progress.step, len(run.data.train), run.device, sum(p.numel() for p in run.trainable),
                    len(run.data.heldout), run.precision.reason, gpu.uuid, gpu.pci_bus_id))
    run.model.train()
    session_started, last_event, steps_this_session, tokens_seen = time.monotonic(), 0.0, 0, 0
    while not run.finished and not control.interrupted:
        step_started = time.monotonic()
        try:
            entry = run.train_step()
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            run.recover_from_out_of_memory(error)
            continue
        now = time.monotonic()
        run.progress.elapsed_s += now - step_started
        steps_this_session, tokens_seen = steps_this_session + 1, tokens_seen + entry["real_tokens"]
        if now - last_event >= MIN_EVENT_INTERVAL_S or run.finished:
            last_event = now
            sink(run.step_event(entry, now - step_started, steps_this_session, tokens_seen, session_started))
        if run.eval_due():
            run.evaluate()
            if sample_prompts:
                run.sample_replies(sample_prompts)
        if run.checkpoint_due():
            sink(CheckpointEvent(run.progress.step, str(run.save_checkpoint())))

    history = run.progress.history
    final_loss = history[-1]["loss"] if history else None
    if control.pause_requested and not run.finished:
        saved = run.save_checkpoint()
        run.release()
        sink(PausedEvent(run.progress.step, str(saved)))
        return TrainingResult(None, run.progress.step, run.total_steps, final_loss, paused=True, stopped_early=False)

    if run.data.heldout and history and "eval_loss" not in history[-1]:
        run.evaluate()  # a stopped run is still judged by its held-out loss before the best one is chosen
    sink(StatusEvent("Saving the adapter…"))
    entry = run.publish()
    shutil.rmtree(run.run_dir, ignore_errors=True)
    stopped_early = not run.finished
    steps = run.progress.step
    run.release()
    sink(FinishedEvent(entry.name, str(entry.path), steps, final_loss, stopped_early))
    return TrainingResult(entry, steps, run.total_steps, final_loss, paused=False, stopped_early=stopped_early)
