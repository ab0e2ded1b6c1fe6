"""What LoRA buys for one run, before it trains: trainable parameters, checkpoint size and memory against
fine-tuning the whole model. `tailor train --dry-run` prints it and the wizard's review page shows it.

The numbers are exact where they can be. Trainable parameters come from peft itself: the run's adapter is attached
(`app.core.peft_setup`, as the trainer does) to the base built on PyTorch's meta device, which has every module and
shape but allocates nothing, so even a 7B model counts in well under a second. The adapter file size is what
safetensors will write for those tensors: an 8-byte length, the JSON header (padded to 8 bytes) and the raw data.
Memory comes from app.core.estimate, which models Tailor's trainer; a full fine-tune is estimated alongside.

An AdaLoRA adapter is published as a plain LoRA padded to one uniform rank (app.core.adalora), which is not known
until pruning ends; its file size is the upper bound, every layer keeping up to init_r.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.core.errors import TailorError
from app.core.estimate import (
    GB, MemoryEstimate, estimate_full_finetune_memory, estimate_training_memory, memory_plan_for_run,
)

if TYPE_CHECKING:
    from app.core.config import RunConfig

SAFETENSORS_METADATA = {"format": "pt"}
"""What peft's save_pretrained (and Tailor's AdaLoRA conversion) put in the header's __metadata__."""
_DTYPE_NAMES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
QUANT_WORDS = {"4bit": "4-bit NF4", "8bit": "8-bit", "none": "16/32-bit"}


@dataclass(frozen=True)
class Footprint:
    """One run's adapter against a full fine-tune of the same base, as plain numbers."""

    base_model: str
    """The base's name (a hub id when known) and how its weights are held while training."""
    adapter: str
    """The adapter in words: method, rank, targets."""
    trainable_params: int
    """Parameters the run trains: peft's own count for this base and adapter."""
    total_params: int
    """All parameters of the wrapped model (base + adapter), as peft counts them."""
    adapter_bytes: int
    """Size of the adapter_model.safetensors the run will publish (an upper bound for AdaLoRA)."""
    adapter_size_is_bound: bool
    """True when adapter_bytes is an upper bound (AdaLoRA: the final rank is decided while training)."""
    base_params: int
    """Parameters of the base model alone: what a full fine-tune trains."""
    full_checkpoint_bytes: int
    """Size of a whole-model safetensors checkpoint in the base's own dtype: what a full fine-tune saves."""
    memory: MemoryEstimate
    """Estimated peak training memory of this run."""
    full_memory: MemoryEstimate
    """Estimated peak training memory of a full fine-tune with the same data settings."""
    device: str
    """'cuda' or 'cpu': where the estimates assume the run happens."""

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(what, this run, full fine-tuning, this run as a share of it): the table the CLI and the wizard show."""
        bound = "≤ " if self.adapter_size_is_bound else ""
        return [
            ("Trainable parameters", f"{self.trainable_params:,}", f"{self.base_params:,}",
             _share(self.trainable_params, self.base_params)),
            ("Checkpoint file", bound + _size(self.adapter_bytes), _size(self.full_checkpoint_bytes),
             _share(self.adapter_bytes, self.full_checkpoint_bytes)),
            (f"Peak memory ({self.device.upper()}, estimate)", _memory(self.memory.total),
             _memory(self.full_memory.total), _share(self.memory.total, self.full_memory.total)),
        ]

    def to_text(self) -> str:
        widths = (30, 20, 20, 10)
        header = ("", "this run", "full fine-tuning", "share")
        lines = [f"Base model: {self.base_model}", f"Adapter: {self.adapter}",
                 f"Parameters: {self.trainable_params:,} trainable of {self.total_params:,} in all", ""]
        for row in (header, *self.rows()):
            lines.append(row[0].ljust(widths[0]) + "".join(cell.rjust(width) for cell, width in zip(row[1:], widths[1:])))
        return "\n".join(lines)


def _size(num_bytes: int) -> str:
    """A file size in decimal units, as file managers show it."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:,.1f} {unit}"
    return f"{num_bytes} B"


def _memory(num_bytes: int) -> str:
    """Memory in the estimate's GB (2^30 bytes, as GPU makers and the review page count it)."""
    return f"{num_bytes / GB:,.2f} GB"


def _share(part: int, whole: int) -> str:
    share = 100 * part / whole if whole else 0
    return f"{share:.2f}%" if share < 10 else f"{share:.0f}%"


def safetensors_size(tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None) -> int:
    """Bytes of the safetensors file holding these tensors ({name: (dtype, shape)}, dtype like 'F32').

    The format: an 8-byte header length, the compact JSON header (__metadata__ first, then each tensor's dtype,
    shape and byte offsets, in the order the data is laid out) padded with spaces to a multiple of 8, then the data.
    safetensors lays tensors out by descending alignment, then by name.
    """
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8}
    order = sorted(tensors, key=lambda name: (-sizes[tensors[name][0]], name))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = tensors[name]
        count = 1
        for dimension in shape:
            count *= dimension
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + count * sizes[dtype]]}
        offset += count * sizes[dtype]
    header_bytes = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + -(-header_bytes // 8) * 8 + offset


def base_hf_config(base: str, trust_remote_code: bool = False):
    """(name, transformers config) of the base, without loading or downloading weights: a local folder, a .gguf
    or the bundled default (converted once, as any run does), else a catalogue model's published shape."""
    from pathlib import Path

    from transformers import AutoConfig

    from app.core.catalogue import find_entry

    entry = None if base == "default" or Path(base).expanduser().exists() else find_entry(base)
    if entry is not None:
        shape = entry.shape
        return entry.hub_id, AutoConfig.for_model(
            shape.architecture, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim, vocab_size=shape.vocab_size,
            tie_word_embeddings=shape.tie_word_embeddings, max_position_embeddings=shape.max_position_embeddings,
            dtype="bfloat16")  # the catalogue's models are published in bf16, which sizes their full checkpoint
    if not (base == "default" or Path(base).expanduser().exists()):
        raise TailorError(f"A dry run needs the shape of '{base}', and it is neither on this computer nor in the "
                          "catalogue.", "Use a catalogue name (tailor estimate --help), a local model folder or a "
                          ".gguf file; or start the real run once, which downloads it.")
    from app.core.models import resolve_base

    resolved = resolve_base(base)
    return resolved.model_id, AutoConfig.from_pretrained(resolved.folder, trust_remote_code=trust_remote_code)


def meta_peft_model(hf_config, config: RunConfig, total_steps: int):
    """The run's adapter on the base, built on the meta device: shapes and names, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.core.models import quiet_transformers
    from app.core.peft_setup import wrap_base

    quiet_transformers()
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=config.model.trust_remote_code)
        return wrap_base(base, config, total_steps)


def adapter_file_tensors(model, config: RunConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of the adapter file the run publishes: peft's saved state dict, or for AdaLoRA the
    plain LoRA it is converted into, at its largest possible uniform rank."""
    from peft import get_peft_model_state_dict

    from app.core.adalora import uniform_rank

    state = get_peft_model_state_dict(model)
    if config.lora.method != "adalora":
        return {name: (_DTYPE_NAMES[str(t.dtype).removeprefix("torch.")][0], tuple(t.shape)) for name, t in state.items()}
    rank = uniform_rank(config.lora.init_r)
    tensors = {}
    for name, tensor in state.items():
        if name.endswith(".lora_A"):
            tensors[name + ".weight"] = ("F32", (rank, tensor.shape[1]))
        elif name.endswith(".lora_B"):
            tensors[name + ".weight"] = ("F32", (tensor.shape[0], rank))
    return tensors


def describe_adapter(config: RunConfig) -> str:
    lora = config.lora
    targets = ", ".join(lora.target_modules)
    if lora.method == "adalora":
        return f"AdaLoRA, rank {lora.init_r} pruned to an average of {lora.target_r}, alpha {lora.alpha:g}, {targets}"
    extras = "".join(f" + {name}" for name, on in (("DoRA", lora.use_dora), ("rsLoRA", lora.use_rslora)) if on)
    return f"LoRA{extras}, rank {lora.rank}, alpha {lora.alpha:g}, {targets}"


def footprint(config: RunConfig, total_steps: int = 1, device: str | None = None) -> Footprint:
    """The footprint of `config`'s run. `total_steps` only shapes AdaLoRA's schedule, never a count."""
    from app.core.catalogue import ModelShape
    from app.core.models import pick_device

    device = device or pick_device()
    name, hf_config = base_hf_config(config.model.base, config.model.trust_remote_code)
    model = meta_peft_model(hf_config, config, total_steps)
    trainable, total = model.get_nb_trainable_parameters()
    base_params = sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name and ".ranknum." not in name)
    shape = ModelShape.from_hf_config(hf_config)
    lora, data, training = config.lora, config.data, config.training
    plan = memory_plan_for_run(config, shape, device)
    settings = {"max_len": data.max_len, "batch_size": training.batch_size,
                "gradient_checkpointing": plan.gradient_checkpointing,
                "checkpoint_every_n_layers": plan.checkpoint_every_n_layers, "device": device}
    dtype = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32")
    _, bytes_per_weight = _DTYPE_NAMES.get(dtype.removeprefix("torch."), ("F32", 4))
    return Footprint(
        base_model=f"{name} ({QUANT_WORDS[plan.quant]}{'' if plan.reason == 'as chosen' else '; ' + plan.reason})", adapter=describe_adapter(config), trainable_params=trainable, total_params=total,
        adapter_bytes=safetensors_size(adapter_file_tensors(model, config), SAFETENSORS_METADATA),
        adapter_size_is_bound=lora.method == "adalora", base_params=base_params,
        full_checkpoint_bytes=base_params * bytes_per_weight,
        memory=estimate_training_memory(shape, quant=plan.quant, rank=lora.largest_rank,
                                        target_modules=lora.target_modules, fused_lora=lora.fused_forward, **settings),
        full_memory=estimate_full_finetune_memory(shape, **settings),
        device=device,
    )
