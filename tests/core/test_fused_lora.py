"""The fused LoRA training forward computes what peft's forward computes (outputs and the adapter's gradients), on the
tiny Llama in 16-bit and in real bitsandbytes NF4, and leaves alone every layer it cannot reproduce exactly."""

from __future__ import annotations

import pytest

from app.core.fused_lora import fuse_lora_layers


def wrapped(tiny_base, dtype_name: str, quant: str = "none", **lora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.core.models import quantization_config

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=dtype, device_map={"": "cpu"},
                                                quantization_config=quantization_config(quant, dtype))
    settings = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **lora}
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **settings))
    with torch.no_grad():  # B starts at zero, which would make every update path look alike
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return model


def loss_and_grads(model):
    import torch

    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    output = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    output.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return output.logits.detach().float(), grads


@pytest.mark.parametrize("dtype_name, quant, tolerance", [
    ("float32", "none", 1e-5),     # same arithmetic, only reassociated
    ("bfloat16", "none", 0.03),    # the update computed in bf16 instead of fp32: bf16 rounding, no more
    ("float32", "4bit", 1e-5),
    ("bfloat16", "4bit", 0.03),
])
def test_the_fused_forward_matches_peft(tiny_base, dtype_name, quant, tolerance):
    import torch

    model = wrapped(tiny_base, dtype_name, quant)
    reference_logits, reference_grads = loss_and_grads(model)
    assert fuse_lora_layers(model) == 7 * model.config.num_hidden_layers  # q k v o gate up down in every block
    logits, grads = loss_and_grads(model)

    scale = reference_logits.abs().max()
    assert (logits - reference_logits).abs().max() <= tolerance * scale
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, "the adapter's weights and gradients stay fp32 for the optimizer"
        reference = reference_grads[name]
        assert torch.linalg.vector_norm(grad - reference) <= 10 * tolerance * torch.linalg.vector_norm(reference), name


@pytest.mark.parametrize("lora", [{"lora_dropout": 0.1}, {"use_dora": True}])
def test_layers_it_cannot_reproduce_keep_peft_forward(tiny_base, lora):
    assert fuse_lora_layers(wrapped(tiny_base, "float32", **lora)) == 0


def test_a_disabled_adapter_still_gives_the_base_output(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    model = wrapped(tiny_base, "float32")
    fuse_lora_layers(model)
    plain = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, device_map={"": "cpu"})
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        expected = plain(input_ids=ids).logits
    assert torch.allclose(disabled, expected, atol=1e-6)
    assert not torch.allclose(adapted, expected, atol=1e-3)
