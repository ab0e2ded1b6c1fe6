"""Short CPU batches train with eager attention and long ones with the fused kernel; either way the step computes the
same loss and gradients, with and without gradient checkpointing, and the model is left as it was loaded."""

from __future__ import annotations

import pytest

from app.core.attention import CPU_EAGER_MAX_LEN, attention_for_batch


def wrapped(tiny_base, implementation: str = "sdpa", checkpointing: bool = False):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, attn_implementation=implementation)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def step(model, length: int, device: str = "cpu"):
    """Loss and adapter gradients of one padded batch; records which kernel ran."""
    import torch

    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, length))
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0
    seen = []
    hook = model.get_base_model().model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(module.config._attn_implementation))
    with attention_for_batch(model, device, length):
        output = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        output.loss.backward()
    hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return output.loss.detach(), grads, seen


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_short_cpu_batch_trains_with_eager_attention_and_the_same_result(tiny_base, checkpointing):
    import torch

    model = wrapped(tiny_base, checkpointing=checkpointing)
    eager_loss, eager_grads, seen = step(model, 16)
    assert set(seen) == {"eager"}, "the forward (and, with checkpointing, its recomputation) ran eager"
    assert model.get_base_model().config._attn_implementation == "sdpa", "restored for evaluation and chat"

    fused_loss, fused_grads, seen = step(model, 16, device="cuda")  # a GPU keeps the fused kernel
    assert set(seen) == {"sdpa"}
    assert torch.allclose(eager_loss, fused_loss, atol=1e-5)
    for name, grad in eager_grads.items():
        assert torch.allclose(grad, fused_grads[name], atol=1e-5), name


def test_a_long_batch_keeps_the_fused_kernel(tiny_base):
    _, _, seen = step(wrapped(tiny_base), CPU_EAGER_MAX_LEN + 1)
    assert set(seen) == {"sdpa"}


def test_a_model_loaded_with_eager_attention_is_left_alone(tiny_base):
    model = wrapped(tiny_base, implementation="eager")
    _, _, seen = step(model, CPU_EAGER_MAX_LEN + 1)
    assert set(seen) == {"eager"} and model.get_base_model().config._attn_implementation == "eager"
