"""Shared fixtures: an offline environment, a per-test library, a tiny random Llama and the real bundled SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import hypothesis_profiles  # noqa: F401  (registers and loads the fast/fuzz profiles)

REPO = Path(__file__).resolve().parents[1]
# Converted base models are slow to rebuild (~20 s for SmolLM2) and safe to share between runs.
os.environ.setdefault("TAILOR_CACHE", str(REPO / ".tailor-test-cache"))
# No test may reach the network: the hub code paths must fail cleanly offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATASETS = REPO / "resources" / "datasets"


@pytest.fixture
def library_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "library"
    monkeypatch.setenv("TAILOR_HOME", str(root))
    return root


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The real bundled SmolLM2-135M-Instruct, converted from its GGUF once and cached."""
    from app.core.models import resolve_base

    return resolve_base("default").folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, smollm2_folder) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template: fast to train, real everything else."""
    from transformers import AutoTokenizer

    from app.selftest import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), AutoTokenizer.from_pretrained(smollm2_folder))


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    """A small persona dataset in OpenAI chat format with replies of varied length."""
    import json

    path = tmp_path / "persona.jsonl"
    questions = ["What is the sun?", "How do I boil an egg?", "Tell me about cats.", "What is 2+2?",
                 "Why is the sky blue?", "Any tip for sleep?", "What is rain?", "Name a planet."]
    with open(path, "w") as handle:
        for index in range(16):
            reply = "Arr matey! " + "Ye be askin' a fine question, " * (1 + index % 4) + "yo ho!"
            handle.write(json.dumps({"messages": [{"role": "user", "content": questions[index % 8]},
                                                  {"role": "assistant", "content": reply}]}) + "\n")
    return path
