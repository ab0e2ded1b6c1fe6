"""The adapter library on disk: damaged folders listed with a reason, foreign PEFT folders added safely, and the
torch-free check of whether an adapter fits a base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from adapter_factory import make_random_adapters

from app.core.errors import AdapterError
from app.core.library import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME, BaseProfile, Library, add_peft_folder, adapter_fit,
)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A Llama of a different width than tiny_base: adapters made for one do not fit the other."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("other-llama")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def foreign_folder(tmp_path, tiny_base) -> Path:
    """A plain PEFT folder as another tool leaves it: no Tailor manifest, plus files that are not the adapter."""
    scratch = Library(tmp_path / "elsewhere")
    entry = make_random_adapters(scratch, tiny_base, ["made-elsewhere"])[0]
    (entry.path / MANIFEST_NAME).unlink()
    (entry.path / "optimizer.pt").write_bytes(b"not part of an adapter")
    return entry.path


def test_damaged_and_half_written_folders_are_listed_with_the_reason(library_root, foreign_folder):
    library = Library(library_root).ensure()
    (library.adapters_dir / "half-written").mkdir()
    truncated = add_peft_folder(library, foreign_folder, "truncated")
    weights = truncated.path / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    pickled = library.adapters_dir / "pickled"
    pickled.mkdir()
    (pickled / ADAPTER_CONFIG).write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    bad_manifest = add_peft_folder(library, foreign_folder, "bad-manifest")
    (bad_manifest.path / MANIFEST_NAME).write_text("{not json")

    problems = {entry.name: entry.problem for entry in library.entries()}
    assert set(problems) == {"half-written", "truncated", "pickled", "bad-manifest"}
    assert "adapter_config.json is missing" in problems["half-written"]
    assert "truncated" in problems["truncated"]
    assert "pickle" in problems["pickled"]
    assert "tailor.json is damaged" in problems["bad-manifest"]
    with pytest.raises(AdapterError, match="damaged"):
        library.get_usable("truncated")


def test_a_foreign_peft_folder_is_added_through_staging_without_stray_files(library_root, foreign_folder):
    library = Library(library_root)
    entry = add_peft_folder(library, foreign_folder, "imported one")

    assert entry.ok and entry.kind == "imported" and entry.rank == 4
    assert {path.name for path in entry.path.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME, "README.md"}
    assert entry.base_model_id == entry.adapter_config()["base_model_name_or_path"]
    assert entry.manifest["name"] == "imported one" and entry.base_fingerprint is None
    assert not list((library.root / ".staging").iterdir()), "nothing half-copied is left behind"
    with pytest.raises(AdapterError, match="already exists"):
        add_peft_folder(library, foreign_folder, "imported one")


def test_pickled_and_non_lora_folders_are_refused_with_the_fix(tmp_path, library_root, foreign_folder):
    library = Library(library_root)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / ADAPTER_CONFIG).write_text((foreign_folder / ADAPTER_CONFIG).read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterError, match="pickled weights") as refused:
        add_peft_folder(library, pickled, "pickled")
    assert "safetensors" in refused.value.hint

    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="LoRA adapters only"):
        add_peft_folder(library, ia3, "ia3")
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        add_peft_folder(library, tmp_path, "nothing")
    assert library.entries() == []


def test_fit_is_judged_from_tensor_shapes_and_fingerprints(library_root, tiny_base, other_base, foreign_folder):
    library = Library(library_root)
    tiny = BaseProfile.from_folder(tiny_base, "tiny")
    fits = make_random_adapters(library, tiny_base, ["fits"])[0]
    trained_elsewhere = make_random_adapters(library, other_base, ["other-base"])[0]
    assert adapter_fit(fits, tiny) is None
    assert "trained for other-llama" in adapter_fit(trained_elsewhere, tiny)

    # Without a manifest (made by another tool), the shapes in the safetensors header decide.
    no_manifest = add_peft_folder(library, trained_elsewhere.path, "no-manifest")
    manifest = {key: value for key, value in no_manifest.manifest.items() if key != "base_model"}
    (no_manifest.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    reason = adapter_fit(library.get("no-manifest"), tiny)
    assert "tensor shapes differ from tiny" in reason and "q_proj" in reason
    assert adapter_fit(add_peft_folder(library, foreign_folder, "foreign-fits"), tiny) is None


def test_rename_delete_and_trash_still_work(library_root, tiny_base):
    library = Library(library_root)
    make_random_adapters(library, tiny_base, ["first"], system_prompt="Be brief.")
    renamed = library.rename("first", "second")
    assert renamed.manifest["name"] == "second" and renamed.system_prompt == "Be brief."
    library.delete("second")
    assert library.entries() == [] and len(library.trash_entries()) == 1
    assert library.empty_trash() == 1 and library.trash_entries() == []
