"""Popular base models that train on a consumer GPU, with the shape numbers needed to size them before download.

The numbers are copied from each model's published config.json, so the memory review can say whether a model fits
before fetching gigabytes. `ModelShape` is the same description built from any local config, which is how folders
and converted GGUF files get estimated too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

# Architectures whose decoder block Tailor knows parameter by parameter. Anything else is sized as if it were a
# Llama block, which is right for most decoder-only models published since 2023 but not guaranteed.
KNOWN_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2", "phi3")

# Qwen2 is the only catalogue family with biases, and only on the query/key/value projections.
_BIASED_LINEARS = {"qwen2": ("q_proj", "k_proj", "v_proj")}
# Gemma 2 normalises both before and after the attention and the MLP; the others only before each.
_NORMS_PER_BLOCK = {"gemma2": 4}


class LinearLayer(NamedTuple):
    """One linear layer of a decoder block, as LoRA sees it (the name is the one peft's target_modules matches)."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only transformer: enough to count its parameters and size its training memory."""

    architecture: str
    """The config's model_type ('llama', 'qwen2', 'phi3', ...); decides the block layout."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the MLP's hidden layer (each of gate and up)."""
    num_hidden_layers: int
    """Number of decoder blocks."""
    num_attention_heads: int
    """Query heads per block."""
    num_key_value_heads: int
    """Key/value heads per block; fewer than the query heads means grouped-query attention."""
    head_dim: int
    """Width of one attention head; usually hidden_size / heads, but Gemma 2 and others set it on their own."""
    vocab_size: int
    """Rows of the token embedding and of the output head."""
    tie_word_embeddings: bool
    """The output head reuses the embedding matrix, so it costs no memory of its own."""
    max_position_embeddings: int
    """Longest context the model was trained for, in tokens."""

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        """Read the shape from a transformers PretrainedConfig (multimodal configs give their text part)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(
            architecture=text.model_type,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab_size=text.vocab_size,
            tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
            max_position_embeddings=getattr(text, "max_position_embeddings", 0) or 0,
        )

    @property
    def is_known_architecture(self) -> bool:
        return self.architecture in KNOWN_ARCHITECTURES

    def linear_layers(self) -> tuple[LinearLayer, ...]:
        """The linear layers of one decoder block (the output head is not in a block and is never listed)."""
        query = self.num_attention_heads * self.head_dim
        key_value = self.num_key_value_heads * self.head_dim
        hidden, inner = self.hidden_size, self.intermediate_size
        if self.architecture == "phi3":
            # Phi-3 fuses q/k/v into one projection and gate/up into another: the same weights, fewer LoRA pairs.
            return (
                LinearLayer("qkv_proj", hidden, query + 2 * key_value),
                LinearLayer("o_proj", query, hidden),
                LinearLayer("gate_up_proj", hidden, 2 * inner),
                LinearLayer("down_proj", inner, hidden),
            )
        return (
            LinearLayer("q_proj", hidden, query),
            LinearLayer("k_proj", hidden, key_value),
            LinearLayer("v_proj", hidden, key_value),
            LinearLayer("o_proj", query, hidden),
            LinearLayer("gate_proj", hidden, inner),
            LinearLayer("up_proj", hidden, inner),
            LinearLayer("down_proj", inner, hidden),
        )

    @property
    def norms_per_block(self) -> int:
        return _NORMS_PER_BLOCK.get(self.architecture, 2)

    def block_linear_weight_count(self) -> int:
        """Weights of one block's linear layers: the part that 4-bit and 8-bit quantisation shrinks."""
        return sum(layer.in_features * layer.out_features for layer in self.linear_layers())

    def block_bias_count(self) -> int:
        biased = _BIASED_LINEARS.get(self.architecture, ())
        return sum(layer.out_features for layer in self.linear_layers() if layer.name in biased)

    def block_norm_count(self) -> int:
        return self.norms_per_block * self.hidden_size

    def embedding_count(self) -> int:
        return self.vocab_size * self.hidden_size

    def output_head_count(self) -> int:
        """Parameters of the output head that are not shared with the embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def parameter_count(self) -> int:
        """Every parameter of the model, counting a tied output head once (as `model.num_parameters()` does)."""
        per_block = self.block_linear_weight_count() + self.block_bias_count() + self.block_norm_count()
        final_norm = self.hidden_size
        return self.num_hidden_layers * per_block + self.embedding_count() + self.output_head_count() + final_norm


@dataclass(frozen=True)
class CatalogueEntry(ModelShape):
    """A base model Tailor can offer by short name, with its published shape."""

    key: str
    """Short name for the command line and settings, like 'smollm2-135m'."""
    hub_id: str
    """Hugging Face hub repository the weights come from."""
    display_name: str
    """Name shown to people, like 'SmolLM2 135M Instruct'."""

    @property
    def shape(self) -> ModelShape:
        return ModelShape(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelShape)})


DEFAULT_KEY = "smollm2-135m"

CATALOGUE: tuple[CatalogueEntry, ...] = (
    CatalogueEntry(
        key="smollm2-135m", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", display_name="SmolLM2 135M Instruct",
        architecture="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    CatalogueEntry(
        key="smollm2-360m", hub_id="HuggingFaceTB/SmolLM2-360M-Instruct", display_name="SmolLM2 360M Instruct",
        architecture="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, head_dim=64, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    CatalogueEntry(
        key="smollm2-1.7b", hub_id="HuggingFaceTB/SmolLM2-1.7B-Instruct", display_name="SmolLM2 1.7B Instruct",
        architecture="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, head_dim=64, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    CatalogueEntry(
        key="qwen2.5-0.5b", hub_id="Qwen/Qwen2.5-0.5B-Instruct", display_name="Qwen2.5 0.5B Instruct",
        architecture="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
    ),
    CatalogueEntry(
        key="qwen2.5-1.5b", hub_id="Qwen/Qwen2.5-1.5B-Instruct", display_name="Qwen2.5 1.5B Instruct",
        architecture="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
    ),
    CatalogueEntry(
        key="qwen2.5-3b", hub_id="Qwen/Qwen2.5-3B-Instruct", display_name="Qwen2.5 3B Instruct",
        architecture="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
    ),
    CatalogueEntry(
        key="qwen2.5-7b", hub_id="Qwen/Qwen2.5-7B-Instruct", display_name="Qwen2.5 7B Instruct",
        architecture="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, head_dim=128, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768,
    ),
    CatalogueEntry(
        key="llama3.2-1b", hub_id="meta-llama/Llama-3.2-1B-Instruct", display_name="Llama 3.2 1B Instruct",
        architecture="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
    ),
    CatalogueEntry(
        key="llama3.2-3b", hub_id="meta-llama/Llama-3.2-3B-Instruct", display_name="Llama 3.2 3B Instruct",
        architecture="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
    ),
    CatalogueEntry(
        key="llama3.1-8b", hub_id="meta-llama/Llama-3.1-8B-Instruct", display_name="Llama 3.1 8B Instruct",
        architecture="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
    ),
    CatalogueEntry(
        key="mistral-7b", hub_id="mistralai/Mistral-7B-Instruct-v0.3", display_name="Mistral 7B Instruct v0.3",
        architecture="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=32768, tie_word_embeddings=False, max_position_embeddings=32768,
    ),
    CatalogueEntry(
        key="gemma2-2b", hub_id="google/gemma-2-2b-it", display_name="Gemma 2 2B it",
        architecture="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, vocab_size=256000, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    CatalogueEntry(
        key="phi3.5-mini", hub_id="microsoft/Phi-3.5-mini-instruct", display_name="Phi-3.5 mini instruct",
        architecture="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=96, vocab_size=32064, tie_word_embeddings=False, max_position_embeddings=131072,
    ),
)


def find_entry(name_or_hub_id: str) -> CatalogueEntry | None:
    """The entry whose short name or hub id matches, ignoring case; None when the model is not in the catalogue."""
    wanted = name_or_hub_id.strip().lower()
    for entry in CATALOGUE:
        if wanted in (entry.key.lower(), entry.hub_id.lower()):
            return entry
    return None
