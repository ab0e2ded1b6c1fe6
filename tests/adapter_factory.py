"""Make real PEFT adapters in milliseconds for tests and benchmarks: random LoRA weights, saved with peft.

LoRA's B matrix starts at zero, so a freshly initialised adapter changes nothing; `init_lora_weights=False` makes
both matrices random, so every adapter really moves the model's outputs (and two adapters move them differently).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from app.core.library import LIBRARY_VERSION, MANIFEST_NAME, AdapterEntry, Library, write_json_atomic
from app.core.models import config_fingerprint


def make_random_adapters(library: Library, base_folder: Path, names: Sequence[str], rank: int = 4,
                         target_modules: Sequence[str] = ("q_proj", "v_proj"), system_prompt: str | None = None,
                         seed: int = 0, **lora_options) -> list[AdapterEntry]:
    """Random-weight LoRA adapters for the model in `base_folder`, published into `library` with a manifest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_folder = Path(base_folder)
    config = json.loads((base_folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    entries = []
    for index, name in enumerate(names):
        torch.manual_seed(seed * 1000 + index)
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), init_lora_weights=False,
                          task_type="CAUSAL_LM", **lora_options)
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():
            # Random init is scaled for training, not for a visible but sane effect on a model's outputs.
            for parameter_name, parameter in peft_model.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.mul_(0.1)
        with library.staging() as staged:
            peft_model.save_pretrained(str(staged))
            write_json_atomic(staged / MANIFEST_NAME, {
                "library_version": LIBRARY_VERSION, "name": name, "kind": "random",
                "system_prompt": system_prompt,
                "base_model": {"id": base_folder.name, "source": str(base_folder),
                               "fingerprint": config_fingerprint(config), "architecture": config.get("model_type")},
                "quant": "4bit",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
            entries.append(library.publish(staged, name))
        model = peft_model.unload()
    return entries
