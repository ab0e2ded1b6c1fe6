"""LoRA per row of a batch: every row of a decode step through its own persona, in two batched matmuls per layer.

peft can run a batch whose rows use different adapters (`adapter_names=`), but it loops over the adapters in every
LoRA layer, slicing out each one's rows and writing them back: about eight small operations per adapter per layer,
which on a small model cost more than the base model's own step (SmolLM2-135M, 4 rows of 4 personas on a CPU: a
step took 1.5x as long as one with every row on the same persona). Here each row's A and B matrices are stacked
once per batch composition, and a layer's update for all rows is `bmm(bmm(x, Aᵀ), Bᵀ) * scaling`, what punica's
BGMV kernel and S-LoRA compute on GPUs. The layers themselves run with no adapter active (the base output), and a
forward hook adds the update. Rows without the layer's adapter (the base, or a persona that does not adapt that
layer) get zeros; ranks that differ are zero-padded to the largest (exact zeros, though a longer sum may round
differently in the last bit).

Only plain LoRA on linear layers stacks like this; `supports` says whether every adapter of a batch is one, and the
caller uses peft's path otherwise (DoRA and other variants, LoRA on embeddings or convolutions, a bias on B,
`modules_to_save`, trainable tokens).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


def supports(peft_model, layers: list, keys: set[str]) -> bool:
    """Whether the adapters `keys` are all plain LoRA on linear layers (None in `keys` stands for the base)."""
    from torch import nn

    keys = keys - {None}
    for key in keys:
        config = peft_model.peft_config[key]
        if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
            return False
    for layer in layers:
        for key in keys:
            if key in getattr(layer, "lora_embedding_A", {}) or key in getattr(layer, "lora_variant", {}):
                return False
            if key in getattr(layer, "lora_A", {}) and not (
                    type(layer.lora_A[key]) is nn.Linear and type(layer.lora_B[key]) is nn.Linear
                    and layer.lora_B[key].bias is None):
                return False
    return True


class RowLora:
    """The stacked LoRA matrices of one batch composition: row i uses adapter `keys[i]` (None: the base)."""

    def __init__(self, layers: list, keys: list[str | None]):
        self.keys = list(keys)
        self._stacks = [stack for stack in (_stack(layer, self.keys) for layer in layers) if stack is not None]

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Forward passes inside add each row's update to every LoRA layer's output (their adapters must be off)."""
        handles = [layer.register_forward_hook(_add_update(a, b, scaling)) for layer, a, b, scaling in self._stacks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _stack(layer, keys: list[str | None]):
    """(layer, A: rows x rank x in, B: rows x out x rank, scaling: rows x 1 x 1), or None if no row adapts it.

    The stacks keep peft's weight layout (out x in) and are multiplied through transposed views, as F.linear
    multiplies a weight, so the BLAS adds up a row's products as it does for peft's update of that row alone: bit
    for bit on SmolLM2's shapes (a whole reply is checked in tests/core/test_running_batch.py), within a last bit on
    shapes where it blocks a batch differently. Stacked contiguously (in x rank) they differed in the last bit
    everywhere, which matters with bitsandbytes' 4-bit CPU kernel: it rounds its input to bf16, so a last-bit
    difference now and then flips a rounding there and grows (~0.2 in SmolLM2's logits)."""
    import torch

    present = {key for key in keys if key is not None and key in getattr(layer, "lora_A", {})}
    if not present:
        return None
    some_key = next(iter(present))
    first = layer.lora_A[some_key].weight
    scaling = torch.tensor([layer.scaling[key] if key in present else 0.0 for key in keys], dtype=first.dtype,
                           device=first.device).view(-1, 1, 1)
    if len({layer.lora_A[key].weight.shape for key in present}) == 1:
        # One rank: one stacking copy per matrix. The batch's composition changes with every request that joins or
        # leaves, and on SmolLM2's 210 layers building the stacks row by row took longer than a decode step.
        zero_a, zero_b = (torch.zeros_like(first), torch.zeros_like(layer.lora_B[some_key].weight)) \
            if len(present) < len(keys) else (None, None)
        a = torch.stack([layer.lora_A[key].weight if key in present else zero_a for key in keys])
        b = torch.stack([layer.lora_B[key].weight if key in present else zero_b for key in keys])
        return layer, a, b, scaling
    rank = max(layer.lora_A[key].weight.shape[0] for key in present)
    out_features = layer.lora_B[some_key].weight.shape[0]
    a = torch.zeros(len(keys), rank, first.shape[1], dtype=first.dtype, device=first.device)
    b = torch.zeros(len(keys), out_features, rank, dtype=first.dtype, device=first.device)
    for row, key in enumerate(keys):
        if key in present:
            down, up = layer.lora_A[key].weight, layer.lora_B[key].weight
            a[row, :down.shape[0]] = down
            b[row, :, :up.shape[1]] = up
    return layer, a, b, scaling


def _add_update(a, b, scaling):
    import torch

    a_t, b_t = a.transpose(1, 2), b.transpose(1, 2)

    def hook(module, args, output):
        # peft's own order and casts: lora_B(lora_A(x)) * scaling, in the adapter's dtype, then the output's.
        update = torch.bmm(torch.bmm(args[0].to(a.dtype), a_t), b_t) * scaling
        return output + update.to(output.dtype)

    return hook
