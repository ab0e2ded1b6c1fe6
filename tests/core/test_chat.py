"""One 4-bit base, many personas: switching changes the model's outputs and switching back restores them bit for
bit; misfits are refused with the reason; conversations become training data; the chat/compare CLI."""

from __future__ import annotations

import threading

import pytest
from adapter_factory import make_random_adapters

from app.cli import main
from app.core.chat import BASE, ChatSession, GenerationSettings, save_conversation
from app.core.data import load_dataset_file
from app.core.errors import AdapterError, TailorError
from app.core.library import Library, add_peft_folder

PROMPT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_base) -> Library:
    library = Library(tmp_path_factory.mktemp("chat-library"))
    make_random_adapters(library, tiny_base, ["alpha", "beta.v2"], system_prompt="You are terse.")
    return library


@pytest.fixture(scope="module")
def session(library, tiny_base):
    """A real 4-bit session; `base_logits` are taken before any adapter touched the model."""
    session = ChatSession(str(tiny_base), "4bit")
    session.base_logits = logits(session, BASE)
    for name in ("alpha", "beta.v2"):
        session.load_adapter(library.get(name))
    return session


def logits(session: ChatSession, choice: str):
    import torch

    inputs = session.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    session.select(choice)
    with torch.inference_mode():
        return session.model(**inputs).logits[0, -1].clone()


def test_switching_changes_outputs_and_switching_back_restores_them_exactly(session):
    import torch

    alpha, beta = logits(session, "alpha"), logits(session, "beta.v2")
    assert not torch.allclose(alpha, session.base_logits, atol=1e-3)
    assert not torch.allclose(alpha, beta, atol=1e-3)
    for choice, expected in [("beta.v2", beta), ("alpha", alpha), (BASE, session.base_logits), ("alpha", alpha),
                             (BASE, session.base_logits), ("beta.v2", beta)]:
        assert torch.equal(logits(session, choice), expected), f"switching to {choice} must give the same logits"


def test_fast_switch_gives_exactly_what_peft_set_adapter_gives(session):
    import torch

    for choice in ("alpha", "beta.v2"):
        session.peft_model.set_adapter(session.adapter_key(choice))
        with torch.inference_mode():
            inputs = session.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            reference = session.model(**inputs).logits[0, -1]
        assert torch.equal(logits(session, choice), reference)


def test_replies_are_repeatable_per_persona_and_stop_flag_ends_them(session):
    settings = GenerationSettings(max_new_tokens=12)
    first = session.reply(session.prompt_messages(PROMPT, "You are terse."), "alpha", settings)
    session.reply(PROMPT, "beta.v2", settings)
    assert session.reply(session.prompt_messages(PROMPT, "You are terse."), "alpha", settings) == first

    stop = threading.Event()
    stop.set()
    stopped = "".join(session.stream(PROMPT, "alpha", GenerationSettings(max_new_tokens=200), stop=stop))
    assert len(session.tokenizer(stopped)["input_ids"]) < 5, "a set stop flag ends generation after one token"
    with pytest.raises(AdapterError, match="not open"):
        next(session.stream(PROMPT, "gamma", settings))


def test_compare_gives_every_choice_the_same_seed_and_settings(session):
    settings = GenerationSettings(max_new_tokens=8, temperature=0.9, seed=7)
    results = session.compare("Hello", [BASE, "alpha", "beta.v2"], settings)
    assert [choice for choice, _ in results] == [BASE, "alpha", "beta.v2"]
    assert session.compare("Hello", [BASE, "alpha", "beta.v2"], settings) == results
    alone = session.reply(session.prompt_messages([{"role": "user", "content": "Hello"}], "You are terse."), "alpha", settings)
    assert alone == results[1][1], "each choice gets its own persona's system prompt and the shared seed"


def test_an_adapter_for_another_base_is_refused_with_the_reason(session, library, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)).save_pretrained(other)
    misfit = make_random_adapters(Library(tmp_path / "elsewhere"), other, ["misfit"])[0]
    with pytest.raises(AdapterError, match="trained for other"):
        session.load_adapter(misfit)
    (misfit.path / "tailor.json").unlink()  # as if made by another tool: now only the shapes can tell
    foreign = add_peft_folder(Library(tmp_path / "foreign"), misfit.path, "foreign")
    with pytest.raises(AdapterError, match="tensor shapes differ"):
        session.load_adapter(foreign)
    assert session.choices() == [BASE, "alpha", "beta.v2"]
    assert torch.equal(logits(session, BASE), session.base_logits), "a refused adapter leaves the model untouched"


def test_a_saved_conversation_is_an_openai_chat_dataset(tmp_path):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"},
               {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Fair winds."}]
    path = save_conversation(tmp_path / "talk.jsonl", history, "You are a pirate.")
    loaded = load_dataset_file(path)
    assert loaded.format == "openai" and len(loaded.conversations) == 1
    assert loaded.conversations[0][0] == {"role": "system", "content": "You are a pirate."}
    assert loaded.conversations[0][1:] == history
    with pytest.raises(TailorError, match="no reply yet"):
        save_conversation(tmp_path / "empty.jsonl", [{"role": "user", "content": "Hi"}], None)


def test_cli_compare_labels_each_choice_and_refuses_unknown_ones(library, capsys):
    args = ["--library", str(library.root), "compare", "--adapters", "base,alpha,beta.v2", "--prompt", "Hi",
            "--max-new-tokens", "6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert all(label in out for label in ("base", "alpha", "beta.v2")) and "greedy (no randomness)" in out
    assert main(["--library", str(library.root), "compare", "--adapters", "base,nobody", "--prompt", "Hi"]) == 2
    assert "No adapter named 'nobody'" in capsys.readouterr().err
    assert main(["--library", str(library.root), "compare", "--adapters", "alpha,alpha", "--prompt", "Hi"]) == 2
