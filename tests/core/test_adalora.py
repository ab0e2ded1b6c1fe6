"""AdaLoRA on the tiny 4-bit Llama: the schedule comes from the planned steps, pruning really moves the budget, a
checkpointed budget resumes exactly, and the plain LoRA it is converted into computes the same logits."""

from __future__ import annotations

import json

import pytest

from app.core.adalora import (
    STANDARD_RANKS, adalora_config, budget_state, convert_adalora_folder, final_ranks,
    get_adalora_model, orthogonal_penalty, ranks_by_layer, read_rank_allocation, restore_budget_state, save_as_lora,
    uniform_rank,
)
from app.core.config import DataSettings, LoraSettings, RunConfig
from app.core.errors import TailorError

TOTAL_STEPS = 12
INIT_R, TARGET_R = 8, 3


def run_config(**lora) -> RunConfig:
    settings = {"method": "adalora", "init_r": INIT_R, "target_r": TARGET_R, "tinit": 0.1, "tfinal": 0.25,
                "dropout": 0.0, **lora}
    return RunConfig(name="ada", data=DataSettings(path="unused.jsonl"), lora=LoraSettings(**settings))


def load_base(folder):
    """The tiny Llama in real bitsandbytes NF4, computing in fp32 so the comparison tests the maths, not rounding."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.core.models import quantization_config

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=quantization_config("4bit", torch.float32))


def batches():
    import torch

    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 2000, (4, 24), generator=generator) for _ in range(4)]


def train(model, optimizer, steps: range) -> None:
    """Tailor's order: backward, optimizer step, update_and_allocate with the 1-based step, zero_grad."""
    data = batches()
    for step in steps:
        ids = data[step % len(data)]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)


def new_optimizer(model):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)


def nonzero_singular_values(model) -> dict[str, int]:
    return {name.removeprefix("base_model.model."): int((module.lora_E["default"] != 0).sum())
            for name, module in model.named_modules() if "default" in getattr(module, "lora_E", {})}


@pytest.fixture(scope="module")
def trained(tiny_base):
    """An AdaLoRA model trained through its whole schedule, so the final budget is in force."""
    import torch

    torch.manual_seed(0)
    model = get_adalora_model(load_base(tiny_base), run_config(), TOTAL_STEPS)
    train(model, new_optimizer(model), range(1, TOTAL_STEPS + 1))
    model.eval()
    return model


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def test_schedule_comes_from_the_planned_steps():
    config = adalora_config(run_config(tinit=0.1, tfinal=0.2, deltaT=5), total_steps=200)
    assert (config.total_step, config.tinit, config.tfinal, config.deltaT) == (200, 20, 40, 5)
    assert (config.init_r, config.target_r, config.lora_alpha) == (INIT_R, TARGET_R, 32)
    # A one-step run still leaves peft its pruning phase (tinit < total - tfinal).
    short = adalora_config(run_config(tinit=0.4, tfinal=0.5), total_steps=1)
    assert short.tinit < short.total_step - short.tfinal


@pytest.mark.parametrize("settings, message", [
    ({"method": "qlora"}, "method must be one of lora, adalora"),
    ({"target_r": 9}, "target_r must be between 1 and init_r (8)"),
    ({"tinit": 0.6, "tfinal": 0.4}, "together below 1"),
    ({"deltaT": 0}, "deltaT must be at least 1"),
    ({"use_dora": True}, "cannot be combined with DoRA"),
    ({"use_rslora": True}, "turn rsLoRA off"),
])
def test_bad_adalora_settings_are_named(settings, message):
    with pytest.raises(TailorError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_config(**settings)


def test_rank_counters_are_frozen(trained):
    trainable = [name for name, p in trained.named_parameters() if p.requires_grad]
    assert trainable and not any(".ranknum." in name for name in trainable)
    assert all(float(m.ranknum["default"]) == INIT_R for m in trained.modules() if hasattr(m, "ranknum") and m.ranknum)


def test_pruning_meets_the_target_average_and_moves_the_budget(trained):
    ranks = nonzero_singular_values(trained)
    assert len(ranks) == 14  # 7 linears x 2 layers
    assert sum(ranks.values()) == TARGET_R * len(ranks)  # the budget is exactly the target average
    assert len(set(ranks.values())) > 1  # not a uniform cut: some layers kept more than others


def test_orthogonal_penalty_is_the_one_peft_adds_to_its_own_loss(trained):
    import torch
    import torch.nn.functional as F

    ids = batches()[0]
    with torch.no_grad():
        output = trained(input_ids=ids, labels=ids)
        plain = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        assert float(orthogonal_penalty(trained)) == pytest.approx(float(output.loss - plain), rel=1e-4, abs=1e-6)


def test_converted_lora_matches_the_adalora_logits(trained, tiny_base, tmp_path):
    import torch
    from peft import PeftModel

    from app.core.export import _require_plain_lora

    allocation = save_as_lora(trained, tmp_path / "lora")
    adapter_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == adapter_config["lora_alpha"]
    assert adapter_config["r"] in STANDARD_RANKS and not adapter_config.get("rank_pattern")
    _require_plain_lora(adapter_config)  # what the GGUF export accepts
    assert allocation.final_ranks == nonzero_singular_values(trained) == final_ranks(tmp_path / "lora")
    assert allocation.uniform_rank == uniform_rank(max(allocation.final_ranks.values()))
    assert read_rank_allocation(tmp_path / "lora") == allocation

    plain = PeftModel.from_pretrained(load_base(tiny_base), str(tmp_path / "lora")).eval()
    ids = batches()[1]
    expected, actual = logits(trained, ids), logits(plain, ids)
    with plain.disable_adapter():
        base_only = logits(plain, ids)
    assert (expected - base_only).abs().max() > 1e-3  # the adapter changes the output, so the match means something
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_a_saved_adalora_folder_converts_to_the_same_adapter(trained, tiny_base, tmp_path):
    import copy

    import torch
    from peft import PeftModel

    # peft's own save cuts the tensors to the rank pattern and rewrites the live config, so save a copy's config.
    model = copy.deepcopy(trained)
    model.save_pretrained(str(tmp_path / "adalora"))
    allocation = convert_adalora_folder(tmp_path / "adalora", tmp_path / "lora")
    assert allocation.final_ranks == nonzero_singular_values(trained)
    plain = PeftModel.from_pretrained(load_base(tiny_base), str(tmp_path / "lora")).eval()
    ids = batches()[2]
    torch.testing.assert_close(logits(plain, ids), logits(trained, ids), rtol=1e-4, atol=1e-4)


def test_converting_a_plain_lora_or_a_damaged_folder_is_refused(tmp_path):
    from app.core.errors import AdapterError

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="is a LORA adapter, not AdaLoRA"):
        convert_adalora_folder(tmp_path, tmp_path / "out")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "ADALORA", "init_r": 8}))
    with pytest.raises(AdapterError, match="Could not read the adapter"):
        convert_adalora_folder(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_resumed_budget_prunes_exactly_like_an_uninterrupted_run(tiny_base):
    import torch

    config = run_config()
    torch.manual_seed(1)
    whole = get_adalora_model(load_base(tiny_base), config, TOTAL_STEPS)
    optimizer = new_optimizer(whole)
    stop_at = 5  # inside the pruning phase: importance averages and a rank pattern are in flight
    train(whole, optimizer, range(1, stop_at + 1))
    saved = {"budget": budget_state(whole), "optimizer": optimizer.state_dict()}
    saved = torch.load(_roundtrip(saved), weights_only=True)  # as the trainer's checkpoint file holds it
    train(whole, optimizer, range(stop_at + 1, TOTAL_STEPS + 1))

    torch.manual_seed(99)  # a different initialisation, all of it overwritten by the restore
    resumed = get_adalora_model(load_base(tiny_base), config, TOTAL_STEPS)
    restore_budget_state(resumed, saved["budget"])
    resumed_optimizer = new_optimizer(resumed)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train(resumed, resumed_optimizer, range(stop_at + 1, TOTAL_STEPS + 1))

    assert nonzero_singular_values(resumed) == nonzero_singular_values(whole)
    for (name, expected), (_, actual) in zip(whole.named_parameters(), resumed.named_parameters()):
        if ".lora_" in name:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def _roundtrip(value):
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def test_ranks_by_layer_averages_each_decoder_layer():
    ranks = {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.mlp.up_proj": 4, "model.layers.1.mlp.up_proj": 7,
             "lm_head": 5}
    assert ranks_by_layer(ranks) == [(0, 3.0), (1, 7.0)]
    assert [uniform_rank(n) for n in (1, 8, 9, 33, 1025)] == [8, 8, 16, 64, 2048]
