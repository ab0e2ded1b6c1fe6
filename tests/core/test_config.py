"""RunConfig validation and its JSON round trip (what checkpoints and manifests store)."""

import pytest

from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
from app.core.errors import TailorError


def test_json_round_trip_keeps_every_field():
    config = RunConfig(
        name="pirate", system_prompt="Arr.", data=DataSettings(path="/data/p.jsonl", max_len=256, packing=True),
        model=ModelSource(base="Qwen/Qwen2.5-0.5B-Instruct", quant="8bit"),
        lora=LoraSettings(rank=8, alpha=16, target_modules=("q_proj", "v_proj"), use_dora=True),
        training=TrainingSettings(epochs=3, max_steps=10, learning_rate=1e-4, grad_accum=2, gradient_checkpointing=True),
    )
    assert RunConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("build, message", [
    (lambda: LoraSettings(rank=0), "rank must be 1-1024"),
    (lambda: ModelSource(quant="3bit"), "Quantisation must be one of"),
    (lambda: TrainingSettings(learning_rate=5), "Learning rate"),
    (lambda: DataSettings(path="x", max_len=4), "Max length"),
    (lambda: RunConfig(name="../evil", data=DataSettings(path="x")), "not a usable adapter name"),
    (lambda: RunConfig(name="base", data=DataSettings(path="x")), "reserved"),
])
def test_invalid_values_are_explained(build, message):
    with pytest.raises(TailorError, match=message):
        build()


def test_incomplete_json_is_a_user_error():
    with pytest.raises(TailorError, match="incomplete"):
        RunConfig.from_json('{"name": "x"}')
