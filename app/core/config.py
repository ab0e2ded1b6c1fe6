"""Everything a training run needs, as frozen dataclasses that round-trip through JSON.

A `RunConfig` is what the wizard builds, what `tailor train` builds from its flags, what a checkpoint stores so
`--resume` continues the same run, and what the adapter manifest records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from app.core.errors import TailorError

QUANT_CHOICES = ("4bit", "8bit", "none")
TRAINING_QUANTS = ("auto", *QUANT_CHOICES)
SCHEDULES = ("cosine", "linear", "constant")
KEEP_CHOICES = ("best", "last")
METHODS = ("lora", "adalora")
DATA_FORMATS = ("auto", "openai", "sharegpt", "alpaca", "text", "prompt_response", "hf_disk")
ALL_LINEAR = "all-linear"

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")


def validate_adapter_name(name: str) -> str:
    """Adapter names become folder names, so keep them portable and free of path tricks."""
    name = name.strip()
    if not _NAME_PATTERN.match(name) or name in (".", "..") or name.lower() == "base":
        raise TailorError(
            f"'{name}' is not a usable adapter name.",
            "Use 1-64 letters, digits, spaces, '.', '_' or '-', starting with a letter or digit ('base' is reserved).",
        )
    return name


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TailorError(message)


@dataclass(frozen=True)
class ModelSource:
    base: str = "default"
    """'default' (bundled SmolLM2-135M-Instruct), a catalogue name, a local HF folder, a .gguf file, or a hub id."""
    quant: str = "auto"
    """How the frozen base weights are held: '4bit' NF4 with double quantisation (QLoRA), '8bit', 'none' (16-bit
    LoRA), or 'auto': 16-bit when the run fits comfortably in free memory, 4-bit when memory is tight."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless the user asks: such code can do anything."""

    def __post_init__(self) -> None:
        _require(bool(self.base.strip()), "The base model is empty; use 'default', a folder, a .gguf file or a hub id.")
        _require(self.quant in TRAINING_QUANTS, f"Quantisation must be one of {', '.join(TRAINING_QUANTS)}, not '{self.quant}'.")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    """Size r of the low-rank A (r x in) and B (out x r) matrices: more rank, more capacity, bigger adapter."""
    alpha: float = 32
    """Scale of the update: the adapter's output is multiplied by alpha / rank (alpha / sqrt(rank) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training. 0 by default: it cost a fifth of each step's time on the CPU
    (bench measurements in docs/recipe.md) and the held-out split with keep='best' already guards a small persona
    set against overfitting; raise it (0.05-0.1) for long runs on small data."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """Which linear layers get an adapter; 'all-linear' means every linear layer except the output head."""
    use_dora: bool = False
    """DoRA: learn a magnitude per output channel besides the direction; often better at low rank, slower."""
    use_rslora: bool = False
    """rsLoRA: scale by alpha / sqrt(rank), which keeps high ranks learning as fast as low ones."""
    method: str = "lora"
    """'lora': every adapted layer gets the same rank. 'adalora' (AdaLoRA): every layer starts at init_r and, while
    training, the least useful ranks are pruned until the layers average target_r, so the budget goes where the
    persona needs it; `rank` is then unused."""
    init_r: int = 24
    """AdaLoRA: the rank every adapted layer starts with, before pruning."""
    target_r: int = 16
    """AdaLoRA: the average rank per adapted layer left after pruning (the final parameter budget); individual layers
    end above or below it."""
    tinit: float = 0.1
    """AdaLoRA: share of the planned steps trained at init_r before pruning starts, so the importance scores that
    decide what to prune have something to go on."""
    tfinal: float = 0.2
    """AdaLoRA: share of the planned steps at the end trained with the final ranks fixed (no more pruning)."""
    deltaT: int = 1
    """AdaLoRA: optimizer steps between two reallocations of the rank budget during the pruning phase."""

    @property
    def fused_forward(self) -> bool:
        """Whether training runs app.core.fused_lora's forward (plain LoRA without dropout) rather than peft's."""
        return self.method == "lora" and self.dropout == 0 and not self.use_dora

    def __post_init__(self) -> None:
        _require(isinstance(self.rank, int) and 1 <= self.rank <= 1024, f"LoRA rank must be 1-1024, not {self.rank}.")
        _require(self.alpha > 0, f"LoRA alpha must be positive, not {self.alpha}.")
        _require(0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), not {self.dropout}.")
        _require(len(self.target_modules) > 0, "Pick at least one target module (or 'all-linear').")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _require(self.method in METHODS, f"The adapter method must be one of {', '.join(METHODS)}, not '{self.method}'.")
        _require(isinstance(self.init_r, int) and 1 <= self.init_r <= 1024, f"AdaLoRA init_r must be 1-1024, not {self.init_r}.")
        _require(isinstance(self.target_r, int) and 1 <= self.target_r <= self.init_r,
                 f"AdaLoRA target_r must be between 1 and init_r ({self.init_r}), not {self.target_r}.")
        _require(0 <= self.tinit < 1 and 0 <= self.tfinal < 1 and self.tinit + self.tfinal < 1,
                 f"AdaLoRA tinit and tfinal are shares of the planned steps: each in [0, 1) and together below 1 "
                 f"(leaving steps to prune in), not {self.tinit} and {self.tfinal}.")
        _require(isinstance(self.deltaT, int) and self.deltaT >= 1, f"AdaLoRA deltaT must be at least 1 step, not {self.deltaT}.")
        if self.method == "adalora":
            _require(not self.use_dora, "AdaLoRA cannot be combined with DoRA; pick one of them.")
            _require(not self.use_rslora, "AdaLoRA scales by alpha / init_r itself; turn rsLoRA off to use it.")

    @property
    def largest_rank(self) -> int:
        """The rank the adapter trains at before any pruning (init_r for AdaLoRA): what sizes memory."""
        return self.init_r if self.method == "adalora" else self.rank

    def peft_target_modules(self) -> str | list[str]:
        return ALL_LINEAR if ALL_LINEAR in self.target_modules else list(self.target_modules)


@dataclass(frozen=True)
class DataSettings:
    path: str
    """The dataset: a .jsonl/.json/.txt/.csv/.parquet file or a folder saved with `datasets.save_to_disk`."""
    format: str = "auto"
    """Dataset layout; 'auto' detects OpenAI chat, ShareGPT, Alpaca, plain text or prompt/response columns."""
    prompt_column: str | None = None
    """For prompt/response tables: the column with the user's text (detected when left empty)."""
    response_column: str | None = None
    """For prompt/response tables: the column with the reply the persona should learn (detected when left empty)."""
    max_len: int = 512
    """Longest training example in tokens; longer ones are cut at this length."""
    packing: bool = False
    """Pack each batch's examples into one row (no padding at all); attention stays within each example."""
    eval_split: float | None = None
    """Share of the rows held out to measure the eval loss on. None: 10% of the rows, at most 50, and none below 20
    rows (small datasets need every example); 0 turns evaluation off."""
    eval_path: str | None = None
    """A separate file of held-out examples; when given, every row of `path` is trained on."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "No dataset was given.")
        _require(self.eval_split is None or 0 <= self.eval_split < 1,
                 f"The eval split must be a fraction in [0, 1), not {self.eval_split}.")
        _require(self.format in DATA_FORMATS, f"Dataset format must be one of {', '.join(DATA_FORMATS)}, not '{self.format}'.")
        _require(16 <= self.max_len <= 131072, f"Max length must be 16-131072 tokens, not {self.max_len}.")


@dataclass(frozen=True)
class TrainingSettings:
    epochs: float = 2
    """Passes over the dataset (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps instead of counting epochs."""
    learning_rate: float = 1e-3
    """Peak learning rate of the adapter weights. 1e-3, not the 2e-4 common for 7B models: a persona of ~200
    examples trains for only ~50 steps, and at 2e-4 the bundled 135M model learns the voice too weakly to survive
    sampled chat (docs/recipe.md); the held-out split and keep='best' guard against overshooting."""
    lr_schedule: str = "cosine"
    """How the learning rate moves after warm-up: 'cosine', 'linear' decay or 'constant'."""
    warmup_ratio: float = 0.03
    """Share of the steps spent ramping the learning rate up from zero."""
    batch_size: int = 8
    """Examples per forward pass. Lower it when memory is short; raise grad_accum to keep the effective batch."""
    grad_accum: int = 1
    """Forward passes per optimizer step (effective batch = batch_size x grad_accum)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass: much less memory, slower steps. None (the default) decides when
    the run starts: off when the run fits comfortably without it, on when memory is tight
    (app.core.estimate.choose_memory_plan), also choosing checkpoint_every_n_layers; the run's saved config records
    what was decided."""
    checkpoint_every_n_layers: int = 1
    """With gradient checkpointing on: recompute only every n-th decoder block (blocks 0, n, 2n, ...) and let the
    others keep their activations. 1 (every block) uses the least memory; 2 keeps about half of what checkpointing
    saves and runs steps about 1.2x faster."""
    seed: int = 42
    """Seed for adapter initialisation, data order and dropout, so a run can be repeated."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many optimizer steps (and always on stop)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold; keeps a bad batch from wrecking the adapter."""
    eval_every: int | None = None
    """Measure the held-out loss every this many steps (and at the end). None: about five times per run."""
    keep: str = "best"
    """Which adapter to publish: 'best' (lowest held-out loss, so late overfitting does not ruin the persona) or
    'last' (the final step's)."""

    def __post_init__(self) -> None:
        _require(self.epochs > 0, f"Epochs must be positive, not {self.epochs}.")
        _require(self.max_steps is None or self.max_steps >= 1, f"Max steps must be at least 1, not {self.max_steps}.")
        _require(0 < self.learning_rate < 1, f"Learning rate must be between 0 and 1, not {self.learning_rate}.")
        _require(self.lr_schedule in SCHEDULES, f"Schedule must be one of {', '.join(SCHEDULES)}.")
        _require(0 <= self.warmup_ratio < 1, "Warm-up ratio must be in [0, 1).")
        _require(self.batch_size >= 1, f"Batch size must be at least 1, not {self.batch_size}.")
        _require(self.grad_accum >= 1, f"Gradient accumulation must be at least 1, not {self.grad_accum}.")
        _require(self.checkpoint_every >= 1, "Checkpoint interval must be at least 1 step.")
        _require(self.checkpoint_every_n_layers >= 1,
                 "Gradient checkpointing's block interval must be at least 1 (1 checkpoints every block).")
        _require(self.eval_every is None or self.eval_every >= 1, "Evaluation interval must be at least 1 step.")
        _require(self.keep in KEEP_CHOICES, f"Keep must be one of {', '.join(KEEP_CHOICES)}, not '{self.keep}'.")

    @property
    def examples_per_step(self) -> int:
        """The effective batch: examples behind one optimizer step."""
        return self.batch_size * self.grad_accum

    def steps_per_epoch(self, examples: int) -> int:
        """Optimizer steps in one pass; an optimizer step never straddles two epochs."""
        return math.ceil(examples / self.examples_per_step)

    def planned_steps(self, examples: int) -> int:
        """The optimizer steps a run over `examples` training examples takes."""
        return self.max_steps or max(1, math.ceil(self.epochs * self.steps_per_epoch(examples)))

    def warmup_steps(self, total_steps: int) -> int:
        """Rounded up, so a short persona run (most are under 34 steps) still warms up instead of getting zero."""
        return math.ceil(self.warmup_ratio * total_steps)

    def eval_interval(self, total_steps: int) -> int:
        return self.eval_every or max(1, math.ceil(total_steps / 5))


@dataclass(frozen=True)
class RunConfig:
    name: str
    """Persona name; also the adapter's folder name in the library."""
    data: DataSettings
    model: ModelSource = field(default_factory=ModelSource)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    system_prompt: str | None = None
    """The persona's system prompt: used in every training example and stored with the adapter for chat."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", validate_adapter_name(self.name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        try:
            return cls(
                name=raw["name"],
                data=DataSettings(**raw["data"]),
                model=ModelSource(**raw.get("model", {})),
                lora=LoraSettings(**{**raw.get("lora", {}), "target_modules": tuple(raw.get("lora", {}).get("target_modules", (ALL_LINEAR,)))}),
                training=TrainingSettings(**raw.get("training", {})),
                system_prompt=raw.get("system_prompt"),
            )
        except (KeyError, TypeError) as exc:
            raise TailorError(f"This run configuration is incomplete or from another version: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TailorError(f"The run configuration is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)
