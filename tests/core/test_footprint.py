"""`tailor train --dry-run` and the footprint behind it: the numbers are the ones peft and the real run produce, and
a dry run writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.cli import main
from app.core.adalora import get_adalora_model, save_as_lora
from app.core.catalogue import find_entry
from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
from app.core.estimate import (
    FP32_BYTES, estimate_full_finetune_memory, estimate_training_memory, lora_param_count, memory_plan_for_run,
)
from app.core.footprint import footprint

TRAIN_FLAGS = ("--max-steps", "2", "--batch-size", "4", "--rank", "8", "--alpha", "16", "--max-len", "128",
               "--eval-split", "0", "--name", "tiny-persona")


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time: any write shows up."""
    if not root.exists():
        return {}
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*")}


def tiny_config(base: Path, data: Path, **lora) -> RunConfig:
    return RunConfig(name="tiny-persona", data=DataSettings(path=str(data), max_len=128, eval_split=0),
                     model=ModelSource(base=str(base)), lora=LoraSettings(rank=8, alpha=16, **lora),
                     training=TrainingSettings(max_steps=2, batch_size=4))


def test_dry_run_matches_peft_and_the_trained_adapter_and_writes_nothing(tiny_base, chat_jsonl, library_root, capsys):
    import torch
    from peft import PeftModel

    from app.core.library import ADAPTER_WEIGHTS, Library
    from app.core.models import load_model

    (library_root / "adapters").mkdir(parents=True)  # an existing library, so "unchanged" is more than "absent"
    before = tree(library_root)
    flags = ("train", "--data", str(chat_jsonl), "--base", str(tiny_base), *TRAIN_FLAGS)
    assert main([*flags, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert tree(library_root) == before, "a dry run must not write into the library"

    expected = footprint(tiny_config(tiny_base, chat_jsonl))
    assert f"{expected.trainable_params:,}" in printed and f"{expected.total_params:,}" in printed
    assert "," in f"{expected.trainable_params:,}"  # thousands separators, as promised

    assert main(list(flags)) == 0
    capsys.readouterr()
    entry = Library(library_root).get("tiny-persona")
    assert (entry.path / ADAPTER_WEIGHTS).stat().st_size == expected.adapter_bytes

    # peft's own count on the real 4-bit model with the trained adapter attached for training.
    model = PeftModel.from_pretrained(load_model(tiny_base, "4bit", "cpu"), str(entry.path), is_trainable=True)
    assert model.get_nb_trainable_parameters() == (expected.trainable_params, expected.total_params)
    assert expected.base_params == sum(p.numel() for p in torch.nn.Module.parameters(model.get_base_model())) \
        - expected.trainable_params + _packed_4bit_correction(model)


def _packed_4bit_correction(model) -> int:
    """bitsandbytes packs two 4-bit weights per stored byte, so a 4-bit Linear's numel() is half its weights."""
    import bitsandbytes as bnb

    return sum(module.weight.numel() for module in model.modules() if isinstance(module, bnb.nn.Linear4bit))


def test_adalora_file_size_is_the_bound_a_conversion_reaches(tiny_base, chat_jsonl, tmp_path):
    """With every rank kept the converted adapter is padded to uniform_rank(init_r): exactly the promised bound."""
    from app.core.models import load_model

    config = tiny_config(tiny_base, chat_jsonl, method="adalora", init_r=8, target_r=4)
    expected = footprint(config, total_steps=10)
    assert expected.adapter_size_is_bound and "≤" in expected.rows()[1][1]
    model = get_adalora_model(load_model(tiny_base, "4bit", "cpu"), config, 10)
    assert model.get_nb_trainable_parameters()[0] == expected.trainable_params
    allocation = save_as_lora(model, tmp_path)
    assert allocation.uniform_rank == 8
    assert os.path.getsize(tmp_path / "adapter_model.safetensors") == expected.adapter_bytes


def test_catalogue_models_are_counted_without_download_and_agree_with_the_shape_formula():
    entry = find_entry("qwen2.5-7b")
    config = RunConfig(name="big", data=DataSettings(path="unused.jsonl"), model=ModelSource(base=entry.key))
    result = footprint(config, device="cuda")
    assert result.trainable_params == lora_param_count(entry.shape, 16)
    assert result.base_params == entry.shape.parameter_count
    assert result.full_checkpoint_bytes == 2 * entry.shape.parameter_count  # published in bf16
    settings = {"max_len": 512, "batch_size": 8, "gradient_checkpointing": True, "device": "cuda"}
    plan = memory_plan_for_run(config, entry.shape, "cuda")  # 16-bit or 4-bit, as the trainer would decide
    assert result.memory == estimate_training_memory(entry.shape, quant=plan.quant, rank=16, **settings)
    assert result.full_memory == estimate_full_finetune_memory(entry.shape, **settings)
    assert result.memory.total < result.full_memory.total / 5


def test_full_finetune_costs_sixteen_bytes_per_parameter_in_mixed_precision():
    shape = find_entry("smollm2-135m").shape
    full = estimate_full_finetune_memory(shape, device="cuda", compute_bytes=2)
    static = full.base_weights + full.optimizer_states + full.gradients + full.adapter_weights
    assert static == 16 * shape.parameter_count
    fp32 = estimate_full_finetune_memory(shape, device="cpu", compute_bytes=FP32_BYTES)
    assert fp32.base_weights + fp32.optimizer_states + fp32.gradients == 16 * shape.parameter_count


def test_dry_run_of_an_unknown_hub_model_is_a_clear_error(chat_jsonl, library_root, capsys):
    assert main(["train", "--data", str(chat_jsonl), "--base", "someone/unknown-model", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "neither on this computer nor in the catalogue" in error and "Traceback" not in error
    assert tree(library_root) == {}


@pytest.mark.parametrize("flags, message", [
    (("--method", "adalora", "--init-r", "4", "--target-r", "8"), "target_r must be between 1 and init_r"),
    (("--method", "adalora", "--dora"), "AdaLoRA cannot be combined with DoRA"),
])
def test_bad_adalora_flags_exit_2(flags, message, chat_jsonl, library_root, capsys):
    assert main(["train", "--data", str(chat_jsonl), *flags, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_the_dry_run_prints_adalora_settings(tiny_base, chat_jsonl, library_root, capsys):
    assert main(["train", "--data", str(chat_jsonl), "--base", str(tiny_base), "--method", "adalora", "--init-r", "12",
                 "--target-r", "6", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "AdaLoRA, rank 12 pruned to an average of 6" in printed and "≤" in printed
    assert json.dumps(tree(library_root)) == "{}"
