"""The peft adapter a run trains, in one place: the trainer wraps the base with it and the dry run counts it, so the
numbers the dry run promises are the ones the run gets."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.core.config import RunConfig


def peft_config(config: RunConfig, total_steps: int):
    """peft's LoraConfig for method 'lora', its AdaLoraConfig (schedule from `total_steps`) for 'adalora'."""
    from peft import LoraConfig

    from app.core.adalora import adalora_config

    lora = config.lora
    if lora.method == "adalora":
        return adalora_config(config, total_steps)
    return LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.peft_target_modules(),
        use_dora=lora.use_dora, use_rslora=lora.use_rslora, bias="none", task_type="CAUSAL_LM",
    )


def wrap_base(base, config: RunConfig, total_steps: int):
    """The base model with the run's adapter attached, ready to train (AdaLoRA's rank counters frozen)."""
    from peft import get_peft_model

    from app.core.adalora import get_adalora_model

    if config.lora.method == "adalora":
        return get_adalora_model(base, config, total_steps)
    return get_peft_model(base, peft_config(config, total_steps))
