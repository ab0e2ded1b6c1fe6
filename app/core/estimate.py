"""Peak training memory, estimated from a model's shape before anything is downloaded or loaded.

The estimate models Tailor's own trainer (app/core/training.py), not a generic recipe. Everything is in bytes.

Static for the whole run:
- Base weights. Block linears at 4.52 bits each in NF4 with double quantisation (4 bits plus an 8-bit absmax per
  64 weights plus an fp32 absmax per 256 of those), at 1 byte plus an fp32 scale per output row in 8-bit, or in the
  compute dtype unquantised. bitsandbytes never quantises the embeddings or the output head, so they stay in the
  compute dtype (a tied head is counted once); so do biases. Norm weights are counted at fp32.
- LoRA: A (r x in) and B (out x r) per targeted linear in fp32 (peft keeps adapters in fp32 over a quantised base),
  plus AdamW's two fp32 moments and one fp32 gradient per trainable weight. The count is exact: it equals peft's
  trainable parameters.
- Runtime: on CUDA the context the driver, cuBLAS and the kernels take before the first tensor; on the CPU the
  Python interpreter with PyTorch, transformers, peft and bitsandbytes loaded, and the tokenizer and dataset.
- The model file, on the CPU: transformers memory-maps it, and when the model computes in the file's dtype the
  embeddings keep pointing into it, so the whole file stays resident for the run (less the pages the embeddings
  share, counted already). glibc's heap is not counted here: a run whose memory is planned tight pins glibc's mmap
  threshold (app/core/cpu_memory.py), which keeps the process near its live tensors, and a comfortable plan lets
  glibc keep freed blocks for reuse, much faster, which choose_memory_plan allows for with UNPINNED_HEAP_GROWTH.

Activations, at the moment of the peak. Autograd saves, per token and per decoder block, in the compute dtype unless
noted (checked against the tensors autograd really saves in a SmolLM2 block, bf16, 4-bit, batch 4: 9% more at 512
tokens with the fused attention kernel, 4% more at 256 with eager attention; on the safe side on purpose):
    * residual stream: 2 x hidden, plus hidden in fp32 per RMSNorm (norms upcast to fp32 inside);
    * attention: q, the output and o_proj's input at heads x head_dim, k and v at key-value heads x head_dim (the
      fused kernel takes grouped heads as they are), the fp32 log-sum-exp per head, and the attention mask (one
      value per key position); eager attention also keeps k and v expanded to every head and the scores;
    * MLP: 4 x intermediate (gate, its activation, up, and their product);
    * LoRA, per targeted linear: with Tailor's fused forward (plain LoRA, dropout 0: the default) only the rank-wide
      A output in the compute dtype; through peft's forward (dropout, DoRA, AdaLoRA) its input once more in fp32
      (peft casts to the adapter dtype, then dropout copies it; counted even where the cast is a no-op, to stay on
      the safe side) plus a 1-byte dropout mask, and the rank-wide A output in fp32.
  Gemma 2 has no fused attention kernel (its logit soft-capping needs the eager path), so its heads x length
  attention scores are kept too, in fp32 and the compute dtype; so are every model's on the CPU for batches short
  enough to train with eager attention there (app.core.attention).
Without gradient checkpointing every block's activations stay saved until the backward pass reaches that block; with
it only each block's input (hidden x compute dtype per token) is kept, and one block at a time is recomputed. With
checkpointing every n-th block only (transformers' `every_n_layers`: blocks 0, n, 2n, ...), the others keep all of
theirs: a middle step that recomputes half the blocks at n = 2.

On top of what is saved, the backward pass has two transient peaks that never overlap, so only the larger counts:
- The loss. Tailor applies the output head only at trained tokens (labels that are not masked), and one slice of
  at most `loss_chunk_tokens` of them at a time (app.core.loss). A slice holds three fp32 values per logit at once:
  the log-softmax, the gradient flowing into it and the gradient of the logits (12 bytes); beside it are the trained
  tokens' hidden states and their gradient (what the slices keep for the backward pass). No logit outlives its slice.
- A block's backward: the recomputed block (with checkpointing), the gradients it produces (a share of a block,
  measured), and the one dequantised copy of a linear weight that bitsandbytes makes for each 4-/8-bit matmul.
`trained_share` is the share of a max-length example's tokens that carry a label; the default is what persona
chat data gives (the bundled pirate and butler sets: 80%; the haiku set, short replies: 44%).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from app.core.attention import EAGER_BYTES_PER_SCORE, eager_attention_len
from app.core.catalogue import LinearLayer, ModelShape
from app.core.config import ALL_LINEAR, QUANT_CHOICES
from app.core.errors import TailorError
from app.core.loss import loss_chunk_tokens

GB = 1024**3
"""GB here means 2^30 bytes: what GPU makers mean by the "8 GB" on the box and what nvidia-smi's MiB add up to."""

DEVICES = ("cuda", "cpu")
FITS, TIGHT, WONT_FIT = "fits", "tight", "won't fit"
UNPINNED_HEAP_GROWTH = 1.35
"""Resident memory over the live tensors when glibc keeps freed blocks for reuse instead of returning them: SmolLM2
16-bit LoRA without checkpointing, batch 8, peaked at 3833 MiB against 2924 MiB with the threshold pinned (1.31x)
while its steps took 4.3 s against 7.6 s; with checkpointing 2281 MiB against 1900 MiB (1.20x), 6.6 s against 7.5 s
(2026-11-29, this project's 2-core CPU)."""
TIGHT_FRACTION = 0.85
"""Above this share of the free memory a run is 'tight': allocator fragmentation or another program can tip it over."""
MAX_LEN_FLOOR = 256
"""auto_fit never cuts examples shorter than this; below it most chat examples lose their replies."""

NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES_PER_WEIGHT = 1.0
FP32_BYTES = 4
DROPOUT_MASK_BYTES = 1
LOSS_BYTES_PER_LOGIT = 3 * FP32_BYTES
"""fp32 log-softmax + fp32 gradient into it + fp32 gradient of the logits, alive together while a slice is computed."""
TRAINED_SHARE = 0.75
"""Default share of a max-length example's tokens that are trained (assistant replies); see the module docstring."""
BLOCK_BACKWARD_WORKING_SHARE = 0.5
"""Gradients alive while one block runs its backward, as a share of that block's saved activations (measured on
the CPU: autograd frees each activation's gradient as soon as the next one is computed)."""
CHECKPOINT_BYTES = 2
"""Bytes per weight in a model's files: published safetensors are bf16."""
CUDA_CONTEXT_BYTES = GB // 2
CPU_RUNTIME_BYTES = 600 * 1024**2
"""Resident memory of a CPU training process before the model loads: Python with torch, transformers, peft and
bitsandbytes imported, and the tokenizer (measured on Linux x86-64 with bench/estimate_vs_rss.py)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak training memory, broken down so a table can show where it goes; every amount is in bytes."""

    base_weights: int
    """The frozen base model as held in memory (quantised block linears, full-size embeddings, norms)."""
    adapter_weights: int
    """LoRA A and B matrices in fp32."""
    optimizer_states: int
    """AdamW's two fp32 moments per trainable weight."""
    gradients: int
    """One fp32 gradient per trainable weight."""
    activations: int
    """Tensors saved for the backward pass: every block's, or with gradient checkpointing only each checkpointed
    block's input (and every other block's activations when only every n-th block is checkpointed)."""
    logits: int
    """The loss's peak: one slice of trained tokens x vocabulary logits, with the log-softmax and its gradients in
    fp32, beside every trained token's hidden state and its gradient."""
    block_backward: int
    """One block's backward: the recomputed block (with checkpointing), its gradients and a dequantised weight."""
    runtime: int
    """CUDA: the context the driver and libraries take before the first tensor. CPU: Python and the libraries."""
    lora_param_count: int
    """Trainable LoRA parameters: sum of r x (in + out) over the targeted linears of every block."""
    gradient_checkpointing: bool
    """Whether the activations were counted with gradient checkpointing on."""
    checkpoint_every_n_layers: int = 1
    """With checkpointing: every n-th decoder block recomputes its activations (1: all of them)."""
    device: str = "cuda"
    """'cuda' or 'cpu': where the run would happen."""
    mapped_checkpoint: int = 0
    """CPU only: the model's file, memory-mapped while it loads and, when the model computes in the file's own dtype
    (the embeddings then share its pages), for the whole run; counted once, less what the base weights share.
    Clean file pages, so the OS can drop them under pressure, but resident memory counts them. 0 on CUDA."""
    checkpoint_while_loading: int = 0
    """CPU only, when every weight is a converted copy (4-bit, or another dtype than the file's): the file is mapped
    only while the model loads, so it adds to the loading peak (with the runtime and the weights being built), which
    is compared with the training peak, not added to it. 0 on CUDA and when the file stays mapped."""

    @property
    def backward_peak(self) -> int:
        """The larger of the two transient peaks; they happen one after the other, never together."""
        return max(self.logits, self.block_backward)

    @property
    def total(self) -> int:
        return sum(amount for _, amount in self.rows())

    @property
    def total_gb(self) -> float:
        return self.total / GB

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) for each part, in the order a table shows them."""
        return [(label, amount) for label, amount, _ in self._parts()]

    def row_fields(self) -> list[str]:
        """The field whose docstring explains each row of rows(), for tooltips."""
        return [field for _, _, field in self._parts()]

    def _parts(self) -> list[tuple[str, int, str]]:
        parts = self._training_parts()
        loading_peak = self.runtime + self.base_weights + self.checkpoint_while_loading
        training_peak = sum(amount for _, amount, _ in parts)
        if self.checkpoint_while_loading and loading_peak > training_peak:
            parts.append(("Loading peak above training (model file mapped)", loading_peak - training_peak,
                          "checkpoint_while_loading"))
        return parts

    def _training_parts(self) -> list[tuple[str, int, str]]:
        peak = ("Backward peak: logits and loss", self.logits, "logits") if self.logits >= self.block_backward \
            else ("Backward peak: one block", self.block_backward, "block_backward")
        return [
            ("Base model weights", self.base_weights, "base_weights"),
            ("LoRA adapter", self.adapter_weights, "adapter_weights"),
            ("Optimizer state (AdamW)", self.optimizer_states, "optimizer_states"),
            ("Gradients", self.gradients, "gradients"),
            ("Saved activations" + checkpointing_words(self.gradient_checkpointing, self.checkpoint_every_n_layers,
                                                       " (gradient checkpointing{})", ""), self.activations, "activations"),
            peak,
            ("CUDA context" if self.device == "cuda" else "Python and libraries", self.runtime, "runtime"),
        ] + ([("Model file, memory-mapped", self.mapped_checkpoint, "mapped_checkpoint")]
             if self.mapped_checkpoint else [])


def checkpointing_words(on: bool, every_n_layers: int, template: str = "gradient checkpointing on{}",
                        off: str = "gradient checkpointing off") -> str:
    """How a run checkpoints, in words: `template` gets '' for every block, else which blocks."""
    if not on:
        return off
    if every_n_layers == 1:
        return template.format("")
    if every_n_layers == 2:
        return template.format(" every other block")
    suffix = "th" if every_n_layers % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(every_n_layers % 10, "th")
    return template.format(f" every {every_n_layers}{suffix} block")


@dataclass(frozen=True)
class FitSuggestion:
    """Settings that fit the free memory, as close to the requested ones as auto_fit could keep them."""

    batch_size: int
    grad_accum: int
    """Forward passes per optimizer step; raised as the batch shrinks so batch_size x grad_accum stays put."""
    max_len: int
    gradient_checkpointing: bool
    checkpoint_every_n_layers: int
    estimate: MemoryEstimate
    """The estimate for exactly these settings."""
    changes: tuple[str, ...]
    """What was changed from the request, in plain words; empty when the request already fitted."""


def select_targets(shape: ModelShape, target_modules: tuple[str, ...] | list[str] | str) -> tuple[LinearLayer, ...]:
    """The block linears LoRA will wrap: every one for 'all-linear' (never the output head), else those named."""
    layers = shape.linear_layers()
    wanted = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if ALL_LINEAR in wanted:
        return layers
    names = {layer.name for layer in layers}
    # peft matches a dotted name like 'self_attn.q_proj' by its last part, so do the same.
    leaves = {target.rsplit(".", 1)[-1] for target in wanted}
    unknown = sorted(leaves - names)
    if unknown or not leaves:
        raise TailorError(
            f"A {shape.architecture} block has no linear layer called {', '.join(unknown) or '(nothing given)'}.",
            f"Its linear layers are {', '.join(layer.name for layer in layers)}; or use '{ALL_LINEAR}'.",
        )
    return tuple(layer for layer in layers if layer.name in leaves)


def lora_param_count(shape: ModelShape, rank: int, target_modules=(ALL_LINEAR,)) -> int:
    """Trainable parameters LoRA adds: r x (in + out) for each targeted linear of each block, as peft counts them."""
    per_block = sum(rank * (layer.in_features + layer.out_features) for layer in select_targets(shape, target_modules))
    return per_block * shape.num_hidden_layers


def _base_weight_bytes(shape: ModelShape, quant: str, compute_bytes: int) -> int:
    if quant == "4bit":
        linears = shape.block_linear_weight_count() * NF4_BYTES_PER_WEIGHT
    elif quant == "8bit":
        row_scales = sum(layer.out_features for layer in shape.linear_layers()) * FP32_BYTES
        linears = shape.block_linear_weight_count() * INT8_BYTES_PER_WEIGHT + row_scales
    else:
        linears = shape.block_linear_weight_count() * compute_bytes
    per_block = linears + shape.block_bias_count() * compute_bytes + shape.block_norm_count() * FP32_BYTES
    unquantised = (shape.embedding_count() + shape.output_head_count()) * compute_bytes
    final_norm = shape.hidden_size * FP32_BYTES
    return math.ceil(shape.num_hidden_layers * per_block + unquantised + final_norm)


def _block_activation_bytes_per_token(shape: ModelShape, targets: tuple[LinearLayer, ...], rank: int, max_len: int,
                                      compute_bytes: int, fused_lora: bool, device: str) -> float:
    hidden, attention_width = shape.hidden_size, shape.num_attention_heads * shape.head_dim
    key_value_width = shape.num_key_value_heads * shape.head_dim
    residual = 2 * hidden * compute_bytes + shape.norms_per_block * hidden * FP32_BYTES
    attention = ((3 * attention_width + 2 * key_value_width) * compute_bytes + shape.num_attention_heads * FP32_BYTES
                 + max_len * compute_bytes)
    expanded_key_values = 2 * (attention_width - key_value_width) * compute_bytes
    if shape.architecture == "gemma2":
        attention += expanded_key_values + shape.num_attention_heads * max_len * (FP32_BYTES + compute_bytes)
    elif max_len <= eager_attention_len(device):
        attention += expanded_key_values + shape.num_attention_heads * max_len * EAGER_BYTES_PER_SCORE
    mlp = 4 * shape.intermediate_size * compute_bytes
    lora = sum(rank * compute_bytes if fused_lora else
               layer.in_features * (FP32_BYTES + DROPOUT_MASK_BYTES) + rank * FP32_BYTES for layer in targets)
    return residual + attention + mlp + lora


def default_compute_bytes(device: str) -> int:
    """Bytes per value in the dtype Tailor trains in on `device` (app.core.precision decides; no torch needed):
    2 on CUDA (bf16, or fp16 on older GPUs), on the CPU 2 where bf16 measured faster, else 4 (fp32)."""
    from app.core.precision import cpu_prefers_bf16

    return 2 if device == "cuda" or cpu_prefers_bf16() else FP32_BYTES


def estimate_training_memory(
    shape: ModelShape,
    *,
    quant: str = "4bit",
    rank: int = 16,
    target_modules: tuple[str, ...] | list[str] | str = (ALL_LINEAR,),
    max_len: int = 512,
    batch_size: int = 8,
    gradient_checkpointing: bool = True,
    checkpoint_every_n_layers: int = 1,
    device: str = "cuda",
    compute_bytes: int | None = None,
    trained_share: float = TRAINED_SHARE,
    checkpoint_bytes: int = CHECKPOINT_BYTES,
    fused_lora: bool = True,
) -> MemoryEstimate:
    """Peak memory of a LoRA/QLoRA run with these settings (see the module docstring for what is counted).

    compute_bytes is the size of one value in the compute dtype; by default what Tailor computes in on that device
    (default_compute_bytes). trained_share is the share of tokens that carry a label (0-1]. checkpoint_bytes is the
    size of one weight in the model's files (2 for the bf16 safetensors models are published in, 4 for the fp32
    folders Tailor converts GGUF files into); it matters on the CPU only, while loading. fused_lora: whether the
    adapter trains through Tailor's fused forward (LoraSettings.fused_forward) or peft's. checkpoint_every_n_layers:
    with checkpointing on, only blocks 0, n, 2n, ... recompute their activations.
    """
    if quant not in QUANT_CHOICES:
        raise TailorError(f"Quantisation must be one of {', '.join(QUANT_CHOICES)}, not '{quant}'.")
    if device not in DEVICES:
        raise TailorError(f"The device must be one of {', '.join(DEVICES)}, not '{device}'.")
    if rank < 1 or max_len < 1 or batch_size < 1 or checkpoint_every_n_layers < 1:
        raise TailorError(f"Rank, max length, batch size and the checkpointed block interval must be at least 1 "
                          f"(got {rank}, {max_len}, {batch_size}, {checkpoint_every_n_layers}).")
    if not 0 < trained_share <= 1:
        raise TailorError(f"The share of trained tokens must be in (0, 1], not {trained_share}.")
    compute_bytes = compute_bytes or default_compute_bytes(device)

    targets = select_targets(shape, target_modules)
    trainable = lora_param_count(shape, rank, target_modules)
    tokens = batch_size * max_len

    block = tokens * _block_activation_bytes_per_token(shape, targets, rank, max_len, compute_bytes, fused_lora,
                                                       device)
    checkpointed = math.ceil(shape.num_hidden_layers / checkpoint_every_n_layers) if gradient_checkpointing else 0
    block_input = tokens * shape.hidden_size * compute_bytes
    # The final norm's saved fp32 input and output, and the hidden states the output head reads at trained tokens.
    final_norm = tokens * 2 * shape.hidden_size * FP32_BYTES
    saved = checkpointed * block_input + (shape.num_hidden_layers - checkpointed) * block + final_norm

    trained_tokens = math.ceil(tokens * trained_share)
    logits = (min(trained_tokens, loss_chunk_tokens(shape.vocab_size)) * shape.vocab_size * LOSS_BYTES_PER_LOGIT
              + 2 * trained_tokens * shape.hidden_size * compute_bytes)
    dequantised_weight = (
        max(layer.in_features * layer.out_features for layer in shape.linear_layers()) * compute_bytes
        if quant != "none" else 0
    )
    recomputed = block if gradient_checkpointing else 0
    block_backward = recomputed + BLOCK_BACKWARD_WORKING_SHARE * block + dequantised_weight

    base_weights = _base_weight_bytes(shape, quant, compute_bytes)
    # On the CPU, weights loaded in the file's own dtype without quantising (at least the embeddings) point into the
    # memory-mapped file, which then stays resident for the run; when every weight is a converted copy, nothing
    # holds the mapping once the model is loaded, and the file counts only while loading.
    file_bytes = shape.parameter_count * checkpoint_bytes if device == "cpu" else 0
    file_kept = device == "cpu" and compute_bytes == checkpoint_bytes
    shared_with_file = (shape.embedding_count() + shape.output_head_count()) * compute_bytes if file_kept else 0

    return MemoryEstimate(
        base_weights=base_weights,
        adapter_weights=trainable * FP32_BYTES,
        optimizer_states=2 * trainable * FP32_BYTES,
        gradients=trainable * FP32_BYTES,
        activations=math.ceil(saved),
        logits=math.ceil(logits),
        block_backward=math.ceil(block_backward),
        runtime=CUDA_CONTEXT_BYTES if device == "cuda" else CPU_RUNTIME_BYTES,
        mapped_checkpoint=file_bytes - shared_with_file if file_kept else 0,
        checkpoint_while_loading=0 if file_kept else file_bytes,
        lora_param_count=trainable,
        gradient_checkpointing=gradient_checkpointing,
        checkpoint_every_n_layers=checkpoint_every_n_layers if gradient_checkpointing else 1,
        device=device,
    )


def estimate_full_finetune_memory(
    shape: ModelShape,
    *,
    max_len: int = 512,
    batch_size: int = 8,
    gradient_checkpointing: bool = True,
    checkpoint_every_n_layers: int = 1,
    device: str = "cuda",
    compute_bytes: int | None = None,
    trained_share: float = TRAINED_SHARE,
) -> MemoryEstimate:
    """Peak memory of training every weight instead (no LoRA, no quantisation), with the same data settings: what
    LoRA's savings are measured against. Weights and their gradients in the compute dtype, an fp32 master copy of
    the weights where that dtype is 16-bit (mixed precision), AdamW's two fp32 moments: 16 bytes per parameter
    either way. Activations and the backward peaks as for an unquantised LoRA run (whose adapter share is tiny)."""
    compute_bytes = compute_bytes or default_compute_bytes(device)
    like_lora = estimate_training_memory(
        shape, quant="none", rank=1, max_len=max_len, batch_size=batch_size,
        gradient_checkpointing=gradient_checkpointing, checkpoint_every_n_layers=checkpoint_every_n_layers,
        device=device, compute_bytes=compute_bytes, trained_share=trained_share,
    )
    parameters = shape.parameter_count
    master_copy = parameters * FP32_BYTES if compute_bytes < FP32_BYTES else 0
    return dataclasses.replace(
        like_lora, base_weights=parameters * compute_bytes + master_copy, adapter_weights=0,
        optimizer_states=2 * parameters * FP32_BYTES, gradients=parameters * compute_bytes, lora_param_count=0,
    )


def verdict(total_bytes: int, available_bytes: int) -> str:
    """'fits' with room to spare, 'tight' within the last 15% of what is free, or "won't fit"."""
    if total_bytes > available_bytes:
        return WONT_FIT
    if total_bytes >= TIGHT_FRACTION * available_bytes:
        return TIGHT
    return FITS


def _candidates(batch_size: int, grad_accum: int, max_len: int, gradient_checkpointing: bool, every_n_layers: int):
    """Settings to try, least disruptive first: checkpointing costs only speed (every other block first, then every
    block), a smaller batch with more accumulation keeps the effective batch, and shorter examples are the last
    resort because they lose text."""
    effective = batch_size * grad_accum
    yield batch_size, grad_accum, max_len, gradient_checkpointing, every_n_layers
    if not gradient_checkpointing:
        gradient_checkpointing, every_n_layers = True, 2
        yield batch_size, grad_accum, max_len, gradient_checkpointing, every_n_layers
    if every_n_layers > 1:
        every_n_layers = 1
        yield batch_size, grad_accum, max_len, gradient_checkpointing, every_n_layers
    while batch_size > 1:
        batch_size //= 2
        grad_accum = max(1, round(effective / batch_size))
        yield batch_size, grad_accum, max_len, gradient_checkpointing, every_n_layers
    while max_len > MAX_LEN_FLOOR:
        max_len = max(MAX_LEN_FLOOR, max_len // 2)
        yield batch_size, grad_accum, max_len, gradient_checkpointing, every_n_layers


def _describe_changes(requested: tuple, chosen: tuple) -> tuple[str, ...]:
    (batch, accum, length, checkpointing, every_n), (new_batch, new_accum, new_length, new_checkpointing, new_every_n) \
        = requested, chosen
    changes = []
    if (new_checkpointing, new_every_n) != (checkpointing, every_n):
        changes.append((f"Gradient checkpointing on every block instead of{checkpointing_words(True, every_n, '{}')}"
                        if checkpointing else f"Turned {checkpointing_words(True, new_every_n)}")
                       + " (less memory, slower steps).")
    if new_batch != batch:
        changes.append(f"Batch size {batch} → {new_batch} with gradient accumulation {accum} → {new_accum} "
                       f"(effective batch {batch * accum} → {new_batch * new_accum}).")
    if new_length != length:
        changes.append(f"Max length {length} → {new_length} tokens (longer examples are cut).")
    return tuple(changes)


def auto_fit(
    shape: ModelShape,
    available_bytes: int,
    *,
    quant: str = "4bit",
    rank: int = 16,
    target_modules: tuple[str, ...] | list[str] | str = (ALL_LINEAR,),
    max_len: int = 512,
    batch_size: int = 8,
    grad_accum: int = 1,
    gradient_checkpointing: bool = False,
    checkpoint_every_n_layers: int = 1,
    device: str = "cuda",
    compute_bytes: int | None = None,
    trained_share: float = TRAINED_SHARE,
    fused_lora: bool = True,
) -> FitSuggestion:
    """The requested settings, or the nearest ones that 'fit' (leave 15% of available_bytes spare).

    Raises TailorError when even batch size 1 with checkpointing at MAX_LEN_FLOOR tokens is too big: the model,
    the quantisation or the rank has to change, which is the user's call.
    """
    requested = (batch_size, grad_accum, max_len, gradient_checkpointing,
                 checkpoint_every_n_layers if gradient_checkpointing else 1)
    for candidate in _candidates(*requested):
        batch, accum, length, checkpointing, every_n = candidate
        estimate = estimate_training_memory(
            shape, quant=quant, rank=rank, target_modules=target_modules, max_len=length, batch_size=batch,
            gradient_checkpointing=checkpointing, checkpoint_every_n_layers=every_n, device=device,
            compute_bytes=compute_bytes, trained_share=trained_share, fused_lora=fused_lora,
        )
        if verdict(estimate.total, available_bytes) == FITS:
            return FitSuggestion(batch, accum, length, checkpointing, every_n, estimate,
                                 _describe_changes(requested, candidate))
    place = "GPU memory" if device == "cuda" else "system memory"
    raise TailorError(
        f"Even at its smallest settings (batch size 1, {length} tokens, gradient checkpointing) this "
        f"{shape.parameter_count / 1e9:.1f}B-parameter model needs about {estimate.total_gb:.1f} GB, "
        f"and {available_bytes / GB:.1f} GB of {place} is free.",
        "Pick a smaller model, use 4-bit quantisation or a lower LoRA rank, or close programs that use the memory.",
    )


@dataclass(frozen=True)
class MemoryPlan:
    """How a run holds its base and its activations, decided once before loading from the memory free."""

    quant: str
    """'4bit', '8bit' or 'none' (16-bit LoRA)."""
    gradient_checkpointing: bool
    reason: str
    """Plain words on the choice, for the review page, the trainer's log and the manifest."""
    return_freed_memory: bool = True
    """On the CPU: give freed tensor memory straight back to the OS (app.core.cpu_memory), keeping the process at its
    live tensors at the cost of slower steps. False for a plan that fits comfortably even with glibc's heap growth,
    whose steps then run 1.1-1.8x faster (UNPINNED_HEAP_GROWTH)."""
    checkpoint_every_n_layers: int = 1
    """With checkpointing: every n-th decoder block recomputes its activations (1: every block)."""


CHECKPOINTING_LEVELS = ((False, 1), (True, 2), (True, 1))
"""Automatic checkpointing, fastest first: off; every other block (steps 1.24x faster than every block, keeping about
half the activations that checkpointing every block drops: bench/trainer_levers.py); every block."""


def choose_memory_plan(requested_quant: str, requested_checkpointing: bool | None, shape: ModelShape,
                       available_bytes: int, *, rank: int, target_modules, max_len: int, batch_size: int,
                       device: str, fused_lora: bool = True, requested_every_n_layers: int = 1) -> MemoryPlan:
    """The user's picks, with 'auto' quantisation and automatic (None) checkpointing filled in: the fastest plan
    that fits comfortably, else the most frugal one.

    Fastest first: 16-bit LoRA (no dequantising every weight at every step, and the persona trains on the weights
    chat uses) before QLoRA; within each, the CHECKPOINTING_LEVELS from no second forward pass to recomputing every
    block. "Comfortably" is the review page's own "fits" verdict: clear of the last 15% of what is free.
    """
    quants = ("none", "4bit") if requested_quant == "auto" else (requested_quant,)
    levels = CHECKPOINTING_LEVELS if requested_checkpointing is None else \
        ((requested_checkpointing, requested_every_n_layers if requested_checkpointing else 1),)
    plans = [(quant, on, every_n) for quant in quants for on, every_n in levels]
    estimates = {plan: estimate_training_memory(shape, quant=plan[0], rank=rank, target_modules=target_modules,
                                                max_len=max_len, batch_size=batch_size,
                                                gradient_checkpointing=plan[1], checkpoint_every_n_layers=plan[2],
                                                device=device, fused_lora=fused_lora)
                 for plan in plans}
    heap_growth = UNPINNED_HEAP_GROWTH if device == "cpu" else 1.0  # glibc's heap; CUDA memory is torch's own

    def fits(plan, growth: float = 1.0) -> bool:
        return verdict(estimates[plan].total * growth, available_bytes) == FITS

    # Skipping checkpointing is for speed, so it is only planned where glibc may keep freed blocks too (the faster
    # allocator); with checkpointing, a plan that fits only at the live tensors keeps to them.
    fitting = [plan for plan in plans if fits(plan, 1.0 if plan[1] else heap_growth)]
    chosen = fitting[0] if fitting else plans[-1]
    quant, on, every_n = chosen
    return_freed_memory = not fits(chosen, heap_growth)
    parts = []
    if requested_quant == "auto":
        parts.append("16-bit LoRA, chosen automatically: it fits comfortably, and is faster and more exact than 4-bit"
                     if quant == "none" else "4-bit QLoRA, chosen automatically: 16-bit would not fit comfortably")
    if requested_checkpointing is None:
        parts.append("gradient checkpointing off, as memory allows: faster steps" if not on else
                     "gradient checkpointing on every other block: it fits that way, and recomputes half as much"
                     if every_n == 2 else "gradient checkpointing on, to save memory")
    if not parts:
        return MemoryPlan(quant, on, "as chosen", return_freed_memory, every_n)
    where = "GPU memory" if device == "cuda" else "RAM"
    amounts = f"about {estimates[chosen].total_gb:.1f} GB needed, {available_bytes / 1e9:.1f} GB of {where} free"
    return MemoryPlan(quant, on, "; ".join(parts) + f" ({amounts})", return_freed_memory, every_n)


def memory_plan_for_run(config, shape: ModelShape, device: str, available_bytes: int | None = None,
                        longest_example: int | None = None) -> MemoryPlan:
    """`choose_memory_plan` for a RunConfig, against the memory free on `device` now (unless given). With the
    dataset's longest example (in tokens) known, batches are planned at that length rather than the max length: a
    persona's examples are mostly far shorter, and no batch is padded beyond its longest row."""
    if available_bytes is None:
        from app.core.gpu import free_memory_bytes

        available_bytes = free_memory_bytes(device)
    return choose_memory_plan(
        config.model.quant, config.training.gradient_checkpointing, shape, available_bytes or 0,
        rank=config.lora.largest_rank, target_modules=config.lora.target_modules,
        max_len=min(config.data.max_len, longest_example or config.data.max_len),
        batch_size=config.training.batch_size, device="cuda" if device.startswith("cuda") else "cpu",
        fused_lora=config.lora.fused_forward, requested_every_n_layers=config.training.checkpoint_every_n_layers)
