"""Decode steps of several rows on a CPU: the plain linear layers multiply as W·xᵀ instead of x·Wᵀ.

A decode step feeds every linear layer one token per row, 2 to 8 rows: a "skinny" product, which MKL (torch's BLAS
on x86) computes slowly as x·Wᵀ. On the bundled SmolLM2-135M (fp32, an AMD Zen 4) a 4-row step took 1.5x as long as
a 1-row step (97 against 65 ms), though both read the same weights. The same product asked for as W·xᵀ, W's rows
dotted with the few columns of xᵀ as in a matrix-vector product, took 56 ms for the 4-row step; 4 clients served
together went from 1.8x to 2.8x the tokens/s of serving them one at a time (`bench/serve_load.py --quant none`; on
the 4-bit base, where only the LM head is plain, from 2.0x to 2.5x). The result is made contiguous at once: left a
transposed view, it slowed every elementwise operation after it more than the copy costs (98 ms for the 4-row step).

It is the same product with its sums grouped another way, so logits move in the last bit (~1e-6 in fp32), as they
already did between one row and several through x·Wᵀ: a greedy reply can differ from `tailor chat`'s only at a
near-tie.

Only `nn.Linear` layers switch: the unquantised base's and the LM head of a quantised one. bitsandbytes' layers keep
their own kernels, and LoRA's own A and B matrices stay as peft computes them.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator


class SkinnyLinears:
    """The plain linear layers of a model, switchable to W·xᵀ for the forward passes inside `applied()`."""

    def __init__(self, model):
        from torch import nn

        self.layers = [module for name, module in model.named_modules()
                       if type(module) is nn.Linear and ".lora_" not in f".{name}"]

    @contextmanager
    def applied(self) -> Iterator[None]:
        for layer in self.layers:
            object.__setattr__(layer, "forward", functools.partial(_skinny_forward, layer))
        try:
            yield
        finally:
            for layer in self.layers:
                object.__delattr__(layer, "forward")


def _skinny_forward(layer, x):
    import torch

    rows = x.reshape(-1, x.shape[-1])
    output = torch.mm(layer.weight, rows.T).T.contiguous()
    if layer.bias is not None:
        output += layer.bias
    return output.view(*x.shape[:-1], output.shape[-1])
