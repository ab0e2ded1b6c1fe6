"""Decoding on an AMD CPU: the plain linear layers multiply a few rows as W·xᵀ instead of x·Wᵀ.

Decoding feeds every linear layer one token per reply: one row in chat, 2 to 8 in a serving batch, a "skinny"
product. On AMD CPUs MKL (torch's BLAS on x86) computes it slowly as x·Wᵀ: on the bundled SmolLM2-135M (fp32, an
AMD Zen 4) with a rank-16 persona, a 1-row decode step took 68 ms and a 4-row step 97 ms, though both read the same
weights. Asked for as W·xᵀ (W's rows dotted with the few columns of xᵀ), the same product made them 45 and 58 ms,
and `tailor chat`'s generate() went from 67 to 44 ms per token (51 to 45 on the 4-bit base, where only the LM head
is plain). A single row is multiplied beside a row of zeros: for one column MKL falls back to its matrix-vector
product, which was the slow one. The result is made contiguous at once; left a transposed view, it slowed every
elementwise operation after it more than the copy costs (98 ms for the 4-row step). Intel CPUs, on which MKL takes
its own tuned paths, were not measured and keep x·Wᵀ (`pays_on`).

It is the same product with its sums grouped another way, so logits move in the last bit (~1e-6 in fp32). Here MKL
summed 1 to 3 rows alike, so a batch of up to 3 replies decoded each exactly as `tailor chat` does; 4 to 8 rows
round the last bit differently, which can change a greedy reply only at a near-tie.

Only fp32 `nn.Linear` layers switch: the unquantised base's and the LM head of a quantised one. bitsandbytes'
layers keep their own kernels, and LoRA's A and B matrices (peft's own modules) stay as peft computes them. Longer
inputs (a prompt being read) keep `F.linear`, which was as fast there.
"""

from __future__ import annotations

import functools

SKINNY_ROWS = 8
"""The most rows multiplied as W·xᵀ: a serving batch's largest (app.core.serving.MAX_BATCH)."""
MEASURED_VENDOR = "AuthenticAMD"


def pays_on(cpu_vendor: str | None) -> bool:
    """Whether W·xᵀ measured faster on CPUs of this vendor (app.core.precision.cpu_vendor): AMD's, where MKL runs
    its one-row product on a single core (pytorch/pytorch#96643) and has no tuned kernels for some products
    (pytorch/builder#504). On Intel CPUs MKL takes its own tuned paths; unmeasured there, they keep F.linear."""
    return cpu_vendor == MEASURED_VENDOR


def install_where_it_pays(model, device: str) -> int:
    """`install` on a CPU of the vendor it measured faster on; returns how many layers it switched (0 elsewhere)."""
    from app.core.precision import cpu_vendor

    return install(model) if device == "cpu" and pays_on(cpu_vendor()) else 0


def install(model) -> int:
    """Switch the model's plain fp32 linear layers (not peft's LoRA matrices) to `skinny_forward`; returns how
    many. Only fp32 was measured: other dtypes go through other kernels (oneDNN's for bf16)."""
    import torch
    from torch import nn

    layers = [module for name, module in model.named_modules()
              if type(module) is nn.Linear and module.weight.dtype == torch.float32 and ".lora_" not in f".{name}"]
    for layer in layers:
        layer.forward = functools.partial(skinny_forward, layer)
    return len(layers)


def skinny_forward(layer, x):
    import torch
    import torch.nn.functional as F

    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if count > SKINNY_ROWS:
        return F.linear(x, layer.weight, layer.bias)
    if count == 1:
        rows = F.pad(rows, (0, 0, 0, 1))
    output = torch.mm(layer.weight, rows.T).T[:count].contiguous()
    if layer.bias is not None:
        output += layer.bias
    return output.view(*x.shape[:-1], output.shape[-1])
