"""Persona mixes: what can be mixed (and why not), saving a mix that plain peft loads with the same logits, and the
`tailor combine` command."""

from __future__ import annotations

import json

import pytest
from adapter_factory import make_random_adapters

from app.cli import main
from app.core.chat import ChatSession
from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
from app.core.errors import AdapterError, TailorError
from app.core.library import Library
from app.core.mixing import METHODS, MixSpec, mix_problem, parse_terms, save_mix

PROMPT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_base) -> Library:
    library = Library(tmp_path_factory.mktemp("mix-library"))
    make_random_adapters(library, tiny_base, ["alpha", "beta"], system_prompt="You are alpha-ish.")
    make_random_adapters(library, tiny_base, ["wide"], rank=8, seed=1)
    make_random_adapters(library, tiny_base, ["dora"], use_dora=True, seed=2)
    return library


@pytest.fixture(scope="module")
def session(library, tiny_base) -> ChatSession:
    session = ChatSession(str(tiny_base), "4bit")
    for name in ("alpha", "beta", "wide"):
        session.load_adapter(library.get(name))
    return session


def next_token_logits(model, tokenizer):
    import torch

    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        return model(**inputs).logits[0, -1].clone()


@pytest.mark.parametrize("method", METHODS)
def test_a_saved_mix_loads_in_plain_peft_with_the_in_app_logits(method, session, library, tiny_base):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name = f"mix-{method}"
    spec = MixSpec((("alpha", 0.7), ("beta", 0.3)), method, density=0.6)
    session.add_mix(name, spec)
    session.select(name)
    in_app = next_token_logits(session.model, session.tokenizer)
    session.select("alpha")
    assert not torch.allclose(in_app, next_token_logits(session.model, session.tokenizer), atol=1e-4)

    entry = save_mix(session, library, name)
    # Plain transformers + bitsandbytes + peft, as any other program would load it.
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, quantization_config=quantization,
                                                device_map={"": "cpu"})
    plain = PeftModel.from_pretrained(base, str(entry.path)).eval()
    assert torch.equal(next_token_logits(plain, session.tokenizer), in_app)
    assert name in session.adapters and name not in session.mixes, "once saved, the mix is that library adapter"


def test_the_mix_manifest_records_parents_weights_and_method(session, library):
    spec = MixSpec((("wide", 1.0), ("alpha", -0.5)), "cat")
    session.add_mix("recorded", spec)
    entry = save_mix(session, library, "recorded")
    assert entry.kind == "mix" and entry.rank == 12, "cat stacks the ranks: 8 + 4"
    assert entry.manifest["parents"] == [{"name": "wide", "weight": 1.0}, {"name": "alpha", "weight": -0.5}]
    assert entry.manifest["method"] == "cat" and entry.manifest["base_model"]["fingerprint"] == session.profile.fingerprint
    assert entry.system_prompt is None, "a mix speaks with the system prompt of its most heavily weighted parent"
    assert entry.trained_with == (session.resolved.source, "4bit")
    assert json.loads((entry.path / "adapter_config.json").read_text())["base_model_name_or_path"] == session.resolved.model_id


def test_adapters_that_cannot_be_mixed_are_refused_with_the_reason(session, library, tiny_base, tmp_path):
    entries = {entry.name: entry for entry in library.entries()}
    unequal = MixSpec((("alpha", 0.5), ("wide", 0.5)), "linear")
    reason = mix_problem(unequal, [entries["alpha"], entries["wide"]])
    assert "linear needs adapters of equal rank" in reason and "alpha has rank 4, wide has rank 8" in reason
    assert "use cat or svd" in reason
    with pytest.raises(AdapterError, match="equal rank"):
        session.add_mix("unequal", unequal)
    for method in ("cat", "svd"):
        assert mix_problem(MixSpec(unequal.parents, method), [entries["alpha"], entries["wide"]]) is None

    assert "DoRA" in mix_problem(MixSpec((("alpha", 1), ("dora", 1)), "cat"), [entries["alpha"], entries["dora"]])

    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)).save_pretrained(other)
    stranger = make_random_adapters(Library(tmp_path / "elsewhere"), other, ["stranger"])[0]
    reason = mix_problem(MixSpec((("alpha", 1), ("stranger", 1)), "cat"), [entries["alpha"], stranger])
    assert "trained on different base models" in reason
    with pytest.raises(AdapterError, match="Open stranger"):
        session.add_mix("strange", MixSpec((("alpha", 1), ("stranger", 1)), "cat"))


def test_mix_terms_and_specs_are_validated():
    assert parse_terms(["pirate:0.7", "poet:-0.3", "plain"]) == (("pirate", 0.7), ("poet", -0.3), ("plain", 1.0))
    with pytest.raises(TailorError, match="not NAME:WEIGHT"):
        parse_terms(["pirate:lots"])
    with pytest.raises(TailorError, match="appears twice"):
        MixSpec((("a", 1), ("a", 2)))
    with pytest.raises(TailorError, match="Unknown mix method"):
        MixSpec((("a", 1),), "average")
    with pytest.raises(TailorError, match="not all zero"):
        MixSpec((("a", 0), ("b", 0)))


def test_cli_combine_mixes_a_trained_and_a_random_persona(tiny_base, chat_jsonl, library_root, capsys):
    from app.core.training import run_training

    library = Library(library_root)
    config = RunConfig(name="pirate", system_prompt="You are a pirate.", data=DataSettings(path=str(chat_jsonl), max_len=128),
                       model=ModelSource(base=str(tiny_base), quant="4bit"), lora=LoraSettings(rank=4, alpha=8),
                       training=TrainingSettings(max_steps=2, batch_size=4, learning_rate=5e-3))
    run_training(config, library)
    make_random_adapters(library, tiny_base, ["poet"])
    make_random_adapters(library, tiny_base, ["wide"], rank=8)

    assert main(["combine", "pirate:0.7", "poet:0.3", "--name", "pirate-poet"]) == 0
    assert "Saved mix 'pirate-poet'" in capsys.readouterr().out
    entry = library.get("pirate-poet")
    assert entry.kind == "mix" and entry.manifest["parents"][0] == {"name": "pirate", "weight": 0.7}
    assert entry.system_prompt == "You are a pirate."
    assert main(["chat", "--adapter", "pirate-poet", "--prompt", "Hi", "--max-new-tokens", "4"]) == 0

    assert main(["combine", "pirate:0.5", "wide:0.5", "--name", "lopsided"]) == 2
    error = capsys.readouterr().err
    assert "linear needs adapters of equal rank" in error and not library.exists("lopsided")
    assert main(["combine", "pirate:0.5", "wide:0.5", "--name", "lopsided", "--method", "svd"]) == 0
    assert library.get("lopsided").rank == 8
    assert main(["combine", "pirate:0.5", "poet:0.5", "--name", "pirate-poet"]) == 2
    assert "already exists" in capsys.readouterr().err
