"""One 4-bit base, many personas: switching changes the model's outputs and switching back restores them bit for
bit; misfits are refused with the reason; conversations become training data; the chat/compare CLI. Decoding that
does not loop (sampling defaults, a penalty on recent repeats, seeds), the persona's recommended settings, chat
precision 'auto', and conversations longer than the model's context."""

from __future__ import annotations

import threading

import pytest
from adapter_factory import make_random_adapters

from app.cli import main
from app.core.chat import (
    BASE, COMFORTABLE_SHARE, ChatSession, GenerationSettings, _logits_processors, choose_precision, save_conversation,
)
from app.core.data import load_dataset_file
from app.core.errors import AdapterError, TailorError
from app.core.library import MANIFEST_NAME, Library, add_peft_folder, write_json_atomic

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
    settings = GenerationSettings(max_new_tokens=12, seed=11)
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
            "--max-new-tokens", "6", "--temperature", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert all(label in out for label in ("base", "alpha", "beta.v2")) and "greedy (no randomness)" in out
    assert main(["--library", str(library.root), "compare", "--adapters", "base,nobody", "--prompt", "Hi"]) == 2
    assert "No adapter named 'nobody'" in capsys.readouterr().err
    assert main(["--library", str(library.root), "compare", "--adapters", "alpha,alpha", "--prompt", "Hi"]) == 2


# Decoding


def test_default_decoding_is_what_local_llm_apps_use():
    settings = GenerationSettings()
    assert (settings.temperature, settings.top_p, settings.top_k, settings.repetition_penalty) == (0.7, 0.9, 40, 1.1)
    assert settings.repetition_window == 64 and not settings.greedy
    assert GenerationSettings(temperature=0).greedy
    assert "greedy" in GenerationSettings(temperature=0).describe()
    assert "repetition penalty 1.1 over the last 64 tokens" in settings.describe()
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(repetition_penalty=0.9)):
        with pytest.raises(TailorError):
            GenerationSettings(**bad)


def test_repetition_penalty_looks_only_at_the_recent_tokens():
    """Unlike transformers' processor (every token of the prompt), ours penalises only the last window of tokens."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    settings = GenerationSettings(repetition_penalty=2.0, repetition_window=4)
    (processor,) = _logits_processors(settings)
    input_ids = torch.tensor([[5, 6, 6, 6, 6, 7, 8, 9, 10]])  # 5 is old (outside the window), 7..10 are recent
    scores = torch.full((1, 16), 4.0)
    scores[0, 8] = -4.0
    penalised = processor(input_ids, scores.clone())
    assert penalised[0, 5] == 4.0, "a token used before the window is not penalised"
    assert penalised[0, 7] == 2.0 and penalised[0, 9] == 2.0, "recent tokens' positive scores are divided"
    assert penalised[0, 8] == -8.0, "recent tokens' negative scores are multiplied"
    assert penalised[0, 11] == 4.0, "unused tokens are untouched"
    assert RepetitionPenaltyLogitsProcessor(2.0)(input_ids, scores.clone())[0, 5] == 2.0, "transformers' looks back all the way"
    assert _logits_processors(GenerationSettings(repetition_penalty=1.0)) == []


def test_a_seed_makes_sampled_replies_repeatable_and_different_seeds_differ(session):
    messages = session.prompt_messages(PROMPT, "You are terse.")
    replies = [session.reply(messages, "alpha", GenerationSettings(max_new_tokens=16, seed=seed)) for seed in (1, 1, 2)]
    assert replies[0] == replies[1]
    assert replies[0] != replies[2]


def test_without_a_seed_sampling_does_not_repeat_the_process_random_state(session):
    """torch seeds every new process identically; unseeded replies must still differ from run to run."""
    import torch

    messages = session.prompt_messages(PROMPT, "You are terse.")
    replies = []
    for _ in range(2):
        torch.manual_seed(0)  # what a fresh `tailor chat --prompt` process starts from
        replies.append(session.reply(messages, "alpha", GenerationSettings(max_new_tokens=16)))
    assert replies[0] != replies[1]


def test_persona_recommended_settings_fill_in_and_bad_values_are_ignored():
    recorded = {"temperature": 0.3, "top_k": 20.0, "repetition_penalty": 99, "top_p": "high", "mystery": 1}
    settings = GenerationSettings(max_new_tokens=50).with_sampling(recorded)
    assert (settings.temperature, settings.top_k, settings.top_p, settings.repetition_penalty) == (0.3, 20, 0.9, 1.1)
    assert settings.max_new_tokens == 50 and isinstance(settings.top_k, int)
    assert settings.sampling() == {"temperature": 0.3, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    assert GenerationSettings().with_sampling(None) == GenerationSettings()


def recommend(library: Library, name: str, sampling: dict | None) -> None:
    entry = library.get(name)
    write_json_atomic(entry.path / MANIFEST_NAME, {**entry.manifest, "sampling": sampling})


def test_cli_chat_flags_seed_and_persona_settings(library, capsys):
    def chat(*extra: str) -> tuple[str, str]:
        assert main(["--library", str(library.root), "chat", "--adapter", "alpha", "--prompt", "Hi",
                     "--max-new-tokens", "10", *extra]) == 0
        captured = capsys.readouterr()
        return captured.out, captured.err

    assert chat("--seed", "3")[0] == chat("--seed", "3")[0], "--seed makes a sampled reply repeatable"
    greedy, said = chat("--temperature", "0")
    assert "Decoding: greedy" in said
    assert chat("--temperature", "0", "--top-k", "5", "--top-p", "0.5")[0] == greedy, "greedy ignores top-k/top-p"
    recommend(library, "alpha", {"temperature": 0, "repetition_penalty": 1.2})
    try:
        out, said = chat()
        assert out == chat("--temperature", "0", "--repetition-penalty", "1.2")[0]
        assert "Decoding: greedy (no randomness), repetition penalty 1.2" in said, "the persona's settings apply"
        assert "Decoding: temperature 0.9, top-p 0.9, top-k 40, repetition penalty 1.2" in chat("--temperature", "0.9")[1], \
            "a flag overrides only its own setting"
    finally:
        recommend(library, "alpha", None)
    assert main(["--library", str(library.root), "chat", "--adapter", "alpha", "--prompt", "Hi", "--top-p", "2"]) == 2
    assert "Top-p must be" in capsys.readouterr().err


def test_cli_says_which_settings_and_precision_it_chose(library, capsys):
    assert main(["--library", str(library.root), "chat", "--adapter", "alpha", "--prompt", "Hi",
                 "--max-new-tokens", "4", "--repetition-penalty", "1.3", "--seed", "9"]) == 0
    err = capsys.readouterr().err
    assert "Precision: full precision (fp32): chosen automatically, it fits comfortably" in err
    assert "Decoding: temperature 0.7, top-p 0.9, top-k 40, repetition penalty 1.3 over the last 64 tokens, seed 9" in err


# Precision


def test_auto_precision_keeps_the_base_unquantised_when_it_fits_comfortably():
    weights = 135_000_000
    roomy = choose_precision("auto", weights, "cpu", free_bytes=20 * 10**9)
    assert (roomy.quant, roomy.dtype) == ("none", "float32") and "fits comfortably" in roomy.describe()
    tight = choose_precision("auto", weights, "cpu", free_bytes=int(weights * 4 / COMFORTABLE_SHARE) - 1)
    assert tight.quant == "4bit" and "would not fit comfortably" in tight.describe()
    assert choose_precision("8bit", weights, "cpu", free_bytes=10**12).quant == "8bit"
    assert choose_precision("none", weights, "cpu", free_bytes=1).quant == "none", "the user's choice stands"
    with pytest.raises(TailorError, match="Unknown chat precision"):
        choose_precision("2bit", weights, "cpu", free_bytes=10**12)


def test_an_auto_session_loads_the_base_unquantised_on_this_machine(tiny_base):
    import torch

    session = ChatSession(str(tiny_base))
    assert session.quant == "none" and session.precision.quant == "none"
    assert session.base_model.dtype == torch.float32
    assert not any("4bit" in type(module).__name__ for module in session.base_model.modules())


# Context


def test_a_conversation_longer_than_the_context_is_trimmed_from_the_oldest_turns(session):
    system = {"role": "system", "content": "You are terse."}
    history = []
    for turn in range(40):
        history += [{"role": "user", "content": f"Question {turn}: " + "tell me more about the sea " * 4},
                    {"role": "assistant", "content": f"Answer {turn}: " + "waves and salt and wind " * 4}]
    new = {"role": "user", "content": "Last question: what is a ship?"}
    settings = GenerationSettings(max_new_tokens=32, temperature=0)
    fitted = session.fit_to_context([system, *history, new], settings)
    assert fitted.dropped > 0 and fitted.note and "the system prompt is kept" in fitted.note
    assert fitted.messages[0] == system and fitted.messages[1]["role"] == "user"
    assert fitted.messages[-1] == new, "the newest message is never cut"
    assert session.prompt_length(fitted.messages) <= session.context_length - settings.max_new_tokens
    assert fitted.messages[1:] == ([*history, new])[fitted.dropped:]
    assert isinstance(session.reply([system, *history, new], "alpha", settings), str), "a reply, not an error"
    short = session.fit_to_context([system, new], settings)
    assert short.dropped == 0 and short.note is None
    with pytest.raises(TailorError, match="This message is too long"):
        session.fit_to_context([system, {"role": "user", "content": "sea " * 2000}], settings)


def test_recommended_settings_travel_in_a_bundle(library, tiny_base, tmp_path):
    from app.core.export import export_adapter
    from app.core.importer import import_adapter

    make_random_adapters(library, tiny_base, ["sailor"])
    recommend(library, "sailor", {"temperature": 0.5, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.15})
    bundle = export_adapter(library, "sailor", "bundle", tmp_path)
    received = Library(tmp_path / "friend")
    imported = import_adapter(received, bundle, base=str(tiny_base))
    assert imported.sampling == {"temperature": 0.5, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.15}
    assert GenerationSettings().with_sampling(imported.sampling).sampling() == imported.sampling


def test_cli_chat_notes_when_older_messages_are_left_out(library, monkeypatch, capsys):
    from app.cli.common import console

    long_message = "Tell me everything about the sea, the ships and the sailors. " * 40  # ~480 tokens each
    typed = iter([long_message, long_message, long_message])

    def type_line(*_args, **_kwargs) -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(console, "input", type_line)
    assert main(["--library", str(library.root), "chat", "--adapter", "alpha", "--max-new-tokens", "4"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("longer than the model can read at once (1024 tokens)") == 2, out


@pytest.mark.slow
def test_the_real_bundled_model_does_not_loop_with_the_default_decoding(smollm2_folder):
    """SmolLM2-135M answering open questions: greedy decoding without a penalty falls into loops on some of them
    (the problem the defaults fix); the default decoding, seeded for repeatability, loops on none."""
    from app.core.evaluation import loops

    session = ChatSession("default")
    prompts = ["Write a short poem about the sea.", "List some fun things to do on a rainy day.",
               "Tell me a story about a dragon.", "Describe your perfect day."]

    def loop_count(settings: GenerationSettings) -> int:
        return sum(loops(session.reply([{"role": "user", "content": prompt}], BASE, settings)) for prompt in prompts)

    assert loop_count(GenerationSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=160)) >= 1
    assert loop_count(GenerationSettings(max_new_tokens=160, seed=0)) == 0
