"""Exports of a real SmolLM2-135M persona adapter (trained in 4-bit): PEFT folder, bundle, merged model, GGUF LoRA."""

from __future__ import annotations

import json
import zipfile

import pytest

from app.cli import main
from app.core.config import DataSettings, ModelSource, RunConfig, TrainingSettings
from app.core.errors import TailorError
from app.core.export import export_adapter
from app.core.library import Library
from app.core.models import BUNDLED_HUB_ID

SYSTEM_PROMPT = "You are Captain Redbeard, a pirate."
PROMPTS = ["What is the sun?", "Tell me about cats.", "How do I boil an egg?"]


@pytest.fixture(scope="module")
def pirate(tmp_path_factory, smollm2_folder) -> tuple[Library, str]:
    """A rank-16 all-linear QLoRA adapter on the real SmolLM2, trained hard enough to change its greedy replies."""
    from app.core.training import run_training

    folder = tmp_path_factory.mktemp("pirate")
    data = folder / "pirate.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": question},
                                                     {"role": "assistant", "content": "Arr matey! Yo ho ho, " + question}]}) + "\n"
                            for question in PROMPTS * 4))
    library = Library(folder / "library")
    config = RunConfig(name="pirate", system_prompt=SYSTEM_PROMPT, model=ModelSource(base="default", quant="4bit"),
                       data=DataSettings(path=str(data), max_len=96),
                       training=TrainingSettings(max_steps=6, batch_size=4, learning_rate=5e-3))
    run_training(config, library)
    return library, "pirate"


def greedy_replies(model, tokenizer) -> list[str]:
    import torch

    replies = []
    for prompt in PROMPTS:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        replies.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return replies


def test_peft_folder_is_the_adapter_plus_a_model_card(pirate, tmp_path):
    library, name = pirate
    target = tmp_path / "pirate-peft"
    events = []
    assert export_adapter(library, name, "peft", target, progress=events.append) == target

    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    source = library.get(name).path
    assert (target / "adapter_model.safetensors").read_bytes() == (source / "adapter_model.safetensors").read_bytes()
    assert json.loads((target / "adapter_config.json").read_text())["base_model_name_or_path"] == BUNDLED_HUB_ID
    card = (target / "README.md").read_text()
    for expected in (f"base_model: {BUNDLED_HUB_ID}", SYSTEM_PROMPT, "pirate.jsonl", "| LoRA rank / alpha / dropout | 16 / 32",
                     "| Steps | 6 of 6 |", "PeftModel.from_pretrained"):
        assert expected in card
    assert events and events[-1].done == events[-1].total
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files are left beside it"


def test_merged_model_replies_exactly_like_base_plus_adapter(pirate, tmp_path, smollm2_folder):
    """The adapter was trained against a 4-bit base, but merging uses the full-precision base, so the honest
    reference is the fp32 base with the adapter applied unmerged (4-bit + adapter differs by quantisation error)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    library, name = pirate
    merged_folder = export_adapter(library, name, "merged", tmp_path / "merged")
    peft_folder = export_adapter(library, name, "peft", tmp_path / "peft")
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in merged_folder.iterdir()}

    tokenizer = AutoTokenizer.from_pretrained(merged_folder)
    merged = AutoModelForCausalLM.from_pretrained(merged_folder).eval()
    assert not any("lora" in key for key in merged.state_dict())
    # The PEFT export must load unchanged in peft: it is the unmerged reference.
    base = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(peft_folder)).eval()

    merged_replies = greedy_replies(merged, tokenizer)
    assert merged_replies == greedy_replies(reference, tokenizer)
    with reference.disable_adapter():
        base_replies = greedy_replies(reference, tokenizer)
    assert merged_replies != base_replies, "the adapter must change the replies, or this comparison proves nothing"

    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        difference = (merged(**inputs).logits - reference(**inputs).logits).abs().max().item()
    assert difference < 1e-3


def test_bundle_is_small_complete_and_checksummed(pirate, tmp_path):
    from app.core.share import parse_checksums, sha256_file

    library, name = pirate
    bundle = export_adapter(library, name, "bundle", tmp_path)
    assert bundle == tmp_path / "pirate.tailor", "a bundle given a folder is written inside it, named after the adapter"
    # Rank 16 on all SmolLM2 linear layers is 19.6 MB of fp32 weights.
    assert bundle.stat().st_size < 25e6

    with zipfile.ZipFile(bundle) as archive:
        assert archive.testzip() is None
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())
        archive.extractall(tmp_path / "unzipped")
    unzipped = tmp_path / "unzipped"
    assert sorted(p.name for p in unzipped.iterdir()) == sorted([
        "adapter_config.json", "adapter_model.safetensors", "README.md", "tailor.json", "training_log.json",
        "chat_template.jinja", "system_prompt.txt", "samples.jsonl", "checksums.sha256"])
    checksums = parse_checksums((unzipped / "checksums.sha256").read_text())
    assert set(checksums) == {p.name for p in unzipped.iterdir()} - {"checksums.sha256"}
    assert all(sha256_file(unzipped / file) == digest for file, digest in checksums.items())
    assert json.loads((unzipped / "tailor.json").read_text()) == library.get(name).manifest
    assert (unzipped / "system_prompt.txt").read_text() == SYSTEM_PROMPT
    assert "<|im_start|>" in (unzipped / "chat_template.jinja").read_text()
    samples = [json.loads(line) for line in (unzipped / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT} for s in samples)


def test_gguf_lora_has_llama_cpp_names_metadata_and_row_order(pirate, tmp_path, smollm2_folder):
    """llama.cpp stores Llama q/k weights with their rows permuted, so a LoRA's B must be permuted the same way.

    The ground truth is llama.cpp's own file: the bundled SmolLM2 GGUF. transformers' GGUF loader undoes the
    permutation (it is how the HF copy of SmolLM2 was made), so undoing it on the GGUF side must give back the HF
    side, both for the base weights (checks the reference) and for the adapter's B @ A (checks the export).
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from app.core.models import bundled_gguf_path

    library, name = pirate
    path = export_adapter(library, name, "gguf", tmp_path / "pirate.gguf")
    reader = GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(32.0)
    lora = {tensor.name: tensor for tensor in reader.tensors}
    assert len(lora) == 30 * 7 * 2
    # Numpy shapes are (rank, in) for A and (out, rank) for B, i.e. GGUF ne [in, rank] and [rank, out].
    assert lora["blk.0.attn_q.weight.lora_a"].data.shape == (16, 576)
    assert lora["blk.0.attn_k.weight.lora_b"].data.shape == (192, 16)
    assert lora["blk.29.ffn_down.weight.lora_a"].data.shape == (16, 1536)

    base_gguf = {tensor.name: tensor for tensor in GGUFReader(bundled_gguf_path()).tensors}
    base_hf = load_file(smollm2_folder / "model.safetensors")
    adapter = load_file(library.get(name).path / "adapter_model.safetensors")
    undo = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for gguf_name, hf_name in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
        tensor_name = f"blk.7.{gguf_name}.weight"
        stored = base_gguf[tensor_name]
        base_rows = dequantize(stored.data, stored.tensor_type).reshape(tuple(reversed([int(n) for n in stored.shape])))
        assert undo.process(base_rows, name=tensor_name).weights == pytest.approx(
            base_hf[f"model.layers.7.self_attn.{hf_name}.weight"].numpy())

        delta_gguf = lora[f"{tensor_name}.lora_b"].data @ lora[f"{tensor_name}.lora_a"].data
        prefix = f"base_model.model.model.layers.7.self_attn.{hf_name}"
        delta_hf = (adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]).numpy()
        assert undo.process(delta_gguf, name=tensor_name).weights == pytest.approx(delta_hf, rel=1e-5, abs=1e-9)


def test_cli_never_overwrites_without_force(pirate, tmp_path, capsys):
    library, name = pirate
    target = tmp_path / "pirate-peft"
    arguments = ["export", name, "--format", "peft", "--out", str(target), "--library", str(library.root)]
    assert main(arguments) == 0
    (target / "adapter_config.json").write_text("{}")

    assert main(arguments) == 2
    assert "--force" in capsys.readouterr().err
    assert (target / "adapter_config.json").read_text() == "{}"

    unrelated = tmp_path / "documents"
    unrelated.mkdir()
    (unrelated / "thesis.txt").write_text("years of work")
    assert main(["export", name, "--format", "peft", "--out", str(unrelated), "--force", "--library", str(library.root)]) == 2
    assert (unrelated / "thesis.txt").read_text() == "years of work", "--force only replaces an earlier export"

    assert main(arguments + ["--force"]) == 0
    assert json.loads((target / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_failed_export_leaves_nothing_behind(pirate, tmp_path, monkeypatch):
    from app.core import export

    def write_half_then_fail(entry, folder, base, report, target):
        (folder / "adapter_config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setitem(export._WRITERS, "peft", write_half_then_fail)
    library, name = pirate
    with pytest.raises(TailorError, match="disk full"):
        export_adapter(library, name, "peft", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unknown_adapter_is_a_user_error(pirate, tmp_path):
    library, _ = pirate
    with pytest.raises(TailorError, match="No adapter named 'nobody'"):
        export_adapter(library, "nobody", "bundle", tmp_path)
