"""A leaner training forward for plain LoRA layers: the low-rank update in the compute dtype, fused into one GEMM.

peft keeps the adapter's A and B in fp32 and, on a bf16 base, casts every layer's *input* to fp32 for the LoRA path,
scales the product, then casts the sum back: three activation-sized copies, a multiply and an add per adapted layer,
forward and backward. Profiled on the bundled model (bf16 on an AMX CPU) they were a fifth of a training step.

Here the two small weights are cast to the activations' dtype instead (a rank-16 matrix, not a batch of hidden
states), the down-projection runs in that dtype, and the up-projection is an `addmm` that adds the scaled update to
the frozen layer's output in the same call. The parameters stay fp32 (the optimizer's master copy); autograd casts
their gradients back through the `.to()`. This is the usual mixed-precision split, and what TRL gets for QLoRA by
storing the adapter in bf16, without giving up fp32 updates.

Only layers whose result this does not change are switched: vanilla LoRA (no DoRA or other variant, no LoRA bias)
with dropout 0 and a single adapter. Anything peft does beyond that (adapters disabled, merged, per-row adapter
names) goes through peft's own forward.
"""

from __future__ import annotations

import types


def _fused_forward(self, x, *args, **kwargs):
    import torch
    import torch.nn.functional as F

    if self.disable_adapters or self.merged or "adapter_names" in kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    name = self.active_adapters[0]
    compute = result.dtype
    down = F.linear(x.to(compute), self.lora_A[name].weight.to(compute))
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                        self.lora_B[name].weight.to(compute).t(), alpha=self.scaling[name])
    return fused.view(result.shape)


def _lora_linear_classes() -> tuple[type, ...]:
    from peft.tuners.lora import Linear

    try:  # peft defines its 4-bit LoRA layer only where bitsandbytes imports
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return (Linear,)
    return (Linear, Linear4bit)


def _is_plain_lora(module, adapter: str, classes: tuple[type, ...]) -> bool:
    import torch.nn as nn

    return (isinstance(module, classes) and module.active_adapters == [adapter]
            and adapter in module.lora_A and adapter not in module.lora_variant
            and not module.lora_bias.get(adapter, False)
            and isinstance(module.lora_dropout[adapter], nn.Identity))


def fuse_lora_layers(model) -> int:
    """Switch every plain LoRA layer of a peft model to the fused forward; returns how many were switched."""
    adapter, classes = model.active_adapter, _lora_linear_classes()
    switched = 0
    for module in model.modules():
        if _is_plain_lora(module, adapter, classes):
            module.forward = types.MethodType(_fused_forward, module)
            switched += 1
    return switched
