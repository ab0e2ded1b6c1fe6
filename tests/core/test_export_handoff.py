"""Hand-off to the engines users grow into: an Ollama folder (GGUF LoRA + Modelfile + README), and vLLM's rules
checked at export time (the model card's exact `vllm serve` line, or what stops vLLM and the fix)."""

from __future__ import annotations

import json

import pytest
from adapter_factory import make_random_adapters

from app.cli import main
from app.core.errors import TailorError
from app.core.export import export_adapter, vllm_max_lora_rank, vllm_problems
from app.core.library import MANIFEST_NAME, Library, write_json_atomic
from app.core.models import BUNDLED_HUB_ID, bundled_gguf_path

SYSTEM_PROMPT = 'You are Captain "Redbeard", a pirate.'


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_base) -> Library:
    library = Library(tmp_path_factory.mktemp("handoff-library"))
    alpha = make_random_adapters(library, tiny_base, ["alpha"], system_prompt=SYSTEM_PROMPT)[0]
    # A persona that recommends its own sampling settings (the manifest's "sampling").
    write_json_atomic(alpha.path / MANIFEST_NAME, {**alpha.manifest, "sampling": {"temperature": 0.4, "top_k": 20}})
    make_random_adapters(library, tiny_base, ["dora"], use_dora=True)
    make_random_adapters(library, tiny_base, ["extras"], bias="lora_only", modules_to_save=["lm_head"])
    return library


def test_ollama_folder_has_the_gguf_lora_a_modelfile_and_a_readme(library, tmp_path):
    import gguf

    target = export_adapter(library, "alpha", "ollama", tmp_path / "alpha-ollama")
    assert sorted(path.name for path in target.iterdir()) == ["Modelfile", "README.md", "alpha.gguf"]
    reader = gguf.GGUFReader(target / "alpha.gguf")
    assert bytes(reader.fields["adapter.type"].parts[-1]).decode() == "lora"
    assert {tensor.name.rsplit(".", 1)[-1] for tensor in reader.tensors} == {"lora_a", "lora_b"}

    lines = (target / "Modelfile").read_text().splitlines()
    assert "FROM ./base.gguf" in lines, "a base with no GGUF on this computer is expected next to the Modelfile"
    assert "ADAPTER ./alpha.gguf" in lines
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in lines
    # The persona's recommendations where it has them, the chat defaults elsewhere.
    for parameter in ("temperature 0.4", "top_k 20", "top_p 0.9", "repeat_penalty 1.1", "repeat_last_n 64"):
        assert f"PARAMETER {parameter}" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    readme = (target / "README.md").read_text()
    assert "ollama create alpha -f Modelfile" in readme and "ollama run alpha" in readme and "base.gguf" in readme


def test_ollama_export_of_a_bundled_model_persona_points_at_the_bundled_gguf(tmp_path, smollm2_folder):
    library = Library(tmp_path / "library")
    make_random_adapters(library, smollm2_folder, ["Sea Dog"], system_prompt="Arr.")
    target = export_adapter(library, "Sea Dog", "ollama", tmp_path / "out")
    modelfile = (target / "Modelfile").read_text()
    assert f"FROM {bundled_gguf_path()}" in modelfile.splitlines()
    assert "smollm2:135m" in modelfile
    assert "ollama create sea-dog -f Modelfile" in (target / "README.md").read_text()


def test_adapters_llama_cpp_cannot_run_are_refused_for_gguf_and_ollama_with_the_reason(library, tmp_path):
    with pytest.raises(TailorError, match="DoRA"):
        export_adapter(library, "dora", "ollama", tmp_path / "dora-ollama")
    with pytest.raises(TailorError, match="modules_to_save.*bias terms"):
        export_adapter(library, "extras", "gguf", tmp_path / "extras.gguf")
    assert not (tmp_path / "dora-ollama").exists() and not (tmp_path / "extras.gguf").exists()


def test_gguf_refuses_per_layer_ranks_and_lora_bias_and_folds_the_rslora_scale_into_alpha(tiny_base, tmp_path):
    """llama.cpp reads one alpha per file and scales every layer by alpha / rank: per-layer ranks or alphas and
    LoRA bias vectors cannot be written, while rsLoRA's alpha / sqrt(rank) is the same scale with alpha * sqrt(rank)
    (tests/core/test_llamacpp.py checks that scale in llama.cpp itself)."""
    import gguf

    library = Library(tmp_path / "library")
    make_random_adapters(library, tiny_base, ["layered"], rank_pattern={"v_proj": 8})
    make_random_adapters(library, tiny_base, ["biased"], lora_bias=True)
    make_random_adapters(library, tiny_base, ["rs"], rank=16, use_rslora=True)
    with pytest.raises(TailorError, match="different rank or alpha per layer") as refused:
        export_adapter(library, "layered", "gguf", tmp_path / "layered.gguf")
    assert "merged" in refused.value.hint
    with pytest.raises(TailorError, match="bias terms"):
        export_adapter(library, "biased", "ollama", tmp_path / "biased-ollama")
    assert not (tmp_path / "layered.gguf").exists() and not (tmp_path / "biased-ollama").exists()
    reader = gguf.GGUFReader(export_adapter(library, "rs", "gguf", tmp_path / "rs.gguf"))
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(2 * 16 * 4)


def test_peft_model_card_gives_the_exact_vllm_serve_line(library, tmp_path):
    target = export_adapter(library, "alpha", "peft", tmp_path / "alpha-peft")
    card = (target / "README.md").read_text()
    base = library.get("alpha").adapter_config()["base_model_name_or_path"]
    assert f"vllm serve {base} --enable-lora --lora-modules alpha={target} --max-lora-rank 8" in card


def test_vllm_rules_are_checked_with_the_fix(library, tmp_path):
    assert vllm_problems(library.get("alpha").adapter_config()) == []
    assert vllm_problems(library.get("dora").adapter_config()) == ["it uses DoRA, which vLLM's LoRA serving does not support"]
    extras = vllm_problems(library.get("extras").adapter_config())
    assert len(extras) == 2 and "modules_to_save: lm_head" in extras[0] and "bias" in extras[1]
    assert "rank 600 is above vLLM's largest --max-lora-rank (512)" in vllm_problems({"peft_type": "LORA", "r": 600})[0]
    assert [vllm_max_lora_rank({"r": rank}) for rank in (1, 4, 8, 9, 300)] == [1, 8, 8, 16, 320]
    assert vllm_max_lora_rank({"r": 8, "rank_pattern": {"q_proj": 40}}) == 64
    card = (export_adapter(library, "dora", "peft", tmp_path / "dora-peft") / "README.md").read_text()
    assert "Not ready for vLLM" in card and "--format merged" in card and "vllm serve" not in card.split("Not ready")[0][-200:]


def test_cli_export_ollama_and_adapters_show_say_what_to_run(library, tmp_path, capsys):
    root = str(library.root)
    assert main(["--library", root, "export", "alpha", "--format", "ollama", "--out", str(tmp_path / "o")]) == 0
    assert "ollama create alpha -f Modelfile" in capsys.readouterr().out
    assert main(["--library", root, "adapters", "show", "alpha"]) == 0
    out = capsys.readouterr().out
    assert "vLLM: ready" in out and f"--lora-modules alpha={library.get('alpha').path}" in out
    assert main(["--library", root, "adapters", "show", "dora"]) == 0
    assert "vLLM: not ready" in capsys.readouterr().out
    assert main(["--library", root, "export", "dora", "--format", "ollama", "--out", str(tmp_path / "d")]) == 2
    assert "DoRA" in capsys.readouterr().err


def test_bundled_hub_id_is_what_vllm_is_told_for_the_bundled_base(tmp_path, smollm2_folder):
    library = Library(tmp_path / "library")
    entry = make_random_adapters(library, smollm2_folder, ["p"])[0]
    manifest = json.loads((entry.path / MANIFEST_NAME).read_text())
    write_json_atomic(entry.path / MANIFEST_NAME, {**manifest, "base_model": {**manifest["base_model"], "id": BUNDLED_HUB_ID}})
    card = (export_adapter(library, "p", "peft", tmp_path / "p-peft") / "README.md").read_text()
    assert f"vllm serve {BUNDLED_HUB_ID} --enable-lora" in card
