"""Which attention kernel a training batch runs on the CPU: chosen per batch, by its padded length.

PyTorch's fused (flash) attention for the CPU has a fast forward but a slow backward on short sequences: profiled on
the bundled SmolLM2 (bf16, batch 8, the cowboy persona's ~100-token rows) its backward was 23% of a training step,
ten times its forward. Plain matmul-softmax-matmul attention ("eager" in transformers) does the same sums and keeps
the batch x heads x length x length probabilities for the backward instead of recomputing them, which at these
lengths is small and much faster. Measured on this project's 2-core AMX CPU, forward + backward of one layer's
attention (batch 8, 9 heads of 64, bf16, padded causal mask):

    length   fused (sdpa)   eager
    100        20.6 ms       5.8 ms
    160        26.9 ms      13.8 ms
    256        31.8 ms      31.0 ms
    384        62.2 ms     116.6 ms

and whole training steps of the cowboy persona went from 2.63 to 2.03 s (peak RSS +170 MiB). So batches up to
CPU_EAGER_MAX_LEN tokens train with eager attention and longer ones with the fused kernel, whose memory does not grow
with length squared. GPUs keep the fused kernels, as do models loaded with another implementation (Gemma 2's logit
soft-capping already needs eager), and so does everything that runs without a backward pass (evaluation, chat).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

CPU_EAGER_MAX_LEN = 256
EAGER_BYTES_PER_SCORE = 4 + 2
"""Eager attention keeps its fp32 softmax output and the compute-dtype copy the second matmul reads."""


def eager_attention_len(device: str) -> int:
    """The longest padded batch that trains with eager attention on `device` (0: never)."""
    return CPU_EAGER_MAX_LEN if device == "cpu" else 0


@contextmanager
def attention_for_batch(model, device: str, length: int) -> Iterator[None]:
    """Run the forward and backward passes inside with the kernel that is fastest for a batch of `length` tokens.

    Both passes must be inside: with gradient checkpointing the backward recomputes the forward, which has to use
    the same kernel as the first time."""
    base = model.get_base_model()
    loaded = base.config._attn_implementation
    wanted = "eager" if loaded == "sdpa" and length <= eager_attention_len(device) else loaded
    if wanted == loaded:
        yield
        return
    base.set_attn_implementation(wanted)
    try:
        yield
    finally:
        base.set_attn_implementation(loaded)
