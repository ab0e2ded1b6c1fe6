"""The GGUF LoRA export run in llama.cpp itself (llama-cpp-python), on the bundled SmolLM2 Q4_1 GGUF.

A pirate persona trained with Tailor on the real SmolLM2 answers held-out questions like a pirate in llama.cpp,
where the base alone does not; and llama.cpp applies the same change to the next-token logits as Tailor's own chat
(peft on the unquantised base), both for that plain LoRA and for an rsLoRA adapter (whose scale the export folds
into alpha). llama-cpp-python compiles llama.cpp on install (10-20 minutes), so it is not a default dependency:
`make test-llamacpp` installs a portable build and runs this file, which skips while it is not installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed; `make test-llamacpp` builds it (10-20 min) and runs this")

from adapter_factory import make_random_adapters  # noqa: E402

from app.core.chat import BASE, ChatSession  # noqa: E402
from app.core.config import DataSettings, LoraSettings, RunConfig, TrainingSettings  # noqa: E402
from app.core.export import export_adapter  # noqa: E402
from app.core.library import Library  # noqa: E402
from app.core.models import bundled_gguf_path  # noqa: E402
from app.core.templates import place_system_prompt, render  # noqa: E402

# The first test also trains the persona: a few CPU minutes, but over 40 minutes of wall time when measured at
# nice 19 on a 2-core machine busy with benchmarks, past the default 15-minute hang guard without anything hanging.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

DATASETS = Path(__file__).resolve().parents[2] / "resources" / "datasets"
SYSTEM_PROMPT = "You are a pirate captain."
HELD_OUT = 10
"""The last examples of pirate.jsonl: never trained on, asked in llama.cpp."""
REPLY_TOKENS = 48
PIRATE_WORDS = re.compile(r"\b(arr+|matey|mateys|ye|yer|ahoy|aye|avast|hearties|landlubbers?|scallywags?|o')(?!\w)",
                          re.IGNORECASE)
"""Words of the training replies' pirate dialect that plain English does not use."""


def pirate_speak(reply: str) -> bool:
    return PIRATE_WORDS.search(reply) is not None


@pytest.fixture(scope="module")
def pirate(tmp_path_factory) -> tuple[Library, list[str]]:
    """A pirate persona trained briefly on the real bundled SmolLM2, and the questions held out from its training."""
    from app.core.training import run_training

    folder = tmp_path_factory.mktemp("llamacpp-pirate")
    lines = [line for line in (DATASETS / "pirate.jsonl").read_text().splitlines() if line.strip()]
    (folder / "train.jsonl").write_text("\n".join(lines[:-HELD_OUT]) + "\n")
    questions = [json.loads(line)["messages"][0]["content"] for line in lines[-HELD_OUT:]]
    library = Library(folder / "library")
    run_training(RunConfig(name="pirate", system_prompt=SYSTEM_PROMPT,
                           data=DataSettings(path=str(folder / "train.jsonl"), max_len=192),
                           lora=LoraSettings(rank=16, alpha=32),
                           training=TrainingSettings(max_steps=20, batch_size=4, learning_rate=1e-3)), library)
    return library, questions


@pytest.fixture(scope="module")
def chat() -> ChatSession:
    """Tailor's own chat on the unquantised base (the de-quantised Q4_1 weights llama.cpp reads)."""
    return ChatSession("default", quant="none")


def llama(lora: Path | None = None, lora_scale: float = 1.0, logits: bool = False):
    """The bundled GGUF in llama.cpp, with the LoRA file applied; `logits` keeps every position's logits (scores)."""
    return llama_cpp.Llama(model_path=str(bundled_gguf_path()), lora_path=str(lora) if lora else None,
                           lora_scale=lora_scale, n_ctx=256 if logits else 1024, logits_all=logits, n_threads=2,
                           seed=0, verbose=False)


def greedy_reply(model, question: str) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    answer = model.create_chat_completion(messages=messages, temperature=0.0, max_tokens=REPLY_TOKENS, repeat_penalty=1.0)
    return answer["choices"][0]["message"]["content"]


def prompt_ids(chat: ChatSession, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return render(chat.tokenizer, place_system_prompt(chat.tokenizer, messages), add_generation_prompt=True,
                  tokenize=True, return_dict=True)["input_ids"]


def llama_logits(model, ids: list[int]):
    model.reset()
    model.eval(ids)
    return np.array(model.scores[model.n_tokens - 1], dtype=np.float64)


def tailor_logits(chat: ChatSession, choice: str, ids: list[int]):
    import torch

    with torch.inference_mode():
        chat.select(choice)
        return chat.model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()


def cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def adapter_effects(chat: ChatSession, choice: str, base, persona, ids: list[int]):
    """How the adapter moves the next-token logits in Tailor's chat and in llama.cpp, for one prompt."""
    tailor = tailor_logits(chat, choice, ids) - tailor_logits(chat, BASE, ids)
    return tailor, llama_logits(persona, ids) - llama_logits(base, ids)


def test_exported_pirate_speaks_like_a_pirate_in_llama_cpp_and_the_base_does_not(pirate, tmp_path):
    """Both get the persona's system prompt, so the difference is the adapter's alone; the base, told it is a
    pirate captain, still says "aye" now and then (2/10 when measured), the persona nearly always (10/10)."""
    library, questions = pirate
    lora = export_adapter(library, "pirate", "gguf", tmp_path / "pirate.gguf")
    persona, base = llama(lora), llama()
    persona_replies = [greedy_reply(persona, question) for question in questions]
    base_replies = [greedy_reply(base, question) for question in questions]
    for question, base_reply, persona_reply in zip(questions, base_replies, persona_replies):
        print(f"{question}\n  base:    {base_reply!r}\n  persona: {persona_reply!r}")
    persona_count, base_count = sum(map(pirate_speak, persona_replies)), sum(map(pirate_speak, base_replies))
    print(f"pirate speak in llama.cpp: persona {persona_count}/{len(questions)}, base {base_count}/{len(questions)}")
    assert persona_count >= 8 and base_count <= 3


def test_llama_cpp_moves_the_logits_as_tailor_chat_does_for_the_pirate(pirate, chat, tmp_path):
    """The Q4_1 base in llama.cpp is the de-quantised base in Tailor's chat up to llama.cpp's 8-bit activations, so
    the adapter's change to the next-token logits must match in direction and size, and the persona's first greedy
    token must be the same; a LoRA applied to the wrong rows (q/k permutation) or at the wrong scale would not."""
    library, questions = pirate
    chat.load_adapter(library.get("pirate"))
    lora = export_adapter(library, "pirate", "gguf", tmp_path / "pirate.gguf")
    base, persona = llama(logits=True), llama(lora, logits=True)
    for question in questions[:3]:
        ids = prompt_ids(chat, question)
        assert cosine(tailor_logits(chat, BASE, ids), llama_logits(base, ids)) > 0.99, "the two bases differ"
        tailor, llamacpp = adapter_effects(chat, "pirate", base, persona, ids)
        print(f"{question}: cosine {cosine(tailor, llamacpp):.4f}, size ratio {np.linalg.norm(llamacpp) / np.linalg.norm(tailor):.3f}")
        assert cosine(tailor, llamacpp) > 0.95
        assert np.linalg.norm(llamacpp) / np.linalg.norm(tailor) == pytest.approx(1, abs=0.15)
        assert int(np.argmax(tailor_logits(chat, "pirate", ids))) == int(np.argmax(llama_logits(persona, ids)))


def test_rslora_scale_reaches_llama_cpp(tmp_path, smollm2_folder, chat):
    """rsLoRA scales by alpha / sqrt(rank), llama.cpp by alpha / rank: the export writes alpha * sqrt(rank), so a
    rank-16 rsLoRA adapter moves llama.cpp's logits as far as peft's. Read at the plain-LoRA scale (lora_scale 1/4,
    what an export without the fold would give) it moves them far less (0.13x when measured), which the same check
    catches."""
    library = Library(tmp_path / "library")
    entry = make_random_adapters(library, smollm2_folder, ["rs"], rank=16, use_rslora=True,
                                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))[0]
    chat.load_adapter(entry)
    lora = export_adapter(library, "rs", "gguf", tmp_path / "rs.gguf")
    base, persona, unfolded = llama(logits=True), llama(lora, logits=True), llama(lora, lora_scale=0.25, logits=True)
    ids = prompt_ids(chat, "What is the capital of France?")
    tailor, llamacpp = adapter_effects(chat, "rs", base, persona, ids)
    ratio = np.linalg.norm(llamacpp) / np.linalg.norm(tailor)
    unfolded_ratio = np.linalg.norm(llama_logits(unfolded, ids) - llama_logits(base, ids)) / np.linalg.norm(tailor)
    print(f"rsLoRA: cosine {cosine(tailor, llamacpp):.4f}, size ratio {ratio:.3f}, unfolded {unfolded_ratio:.3f}")
    assert cosine(tailor, llamacpp) > 0.95 and ratio == pytest.approx(1, abs=0.15)
    assert unfolded_ratio < 0.5
