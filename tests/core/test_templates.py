"""Every catalogue family's real chat template (tests/data/chat_templates/, copied from each model's published
tokenizer_config.json) swapped into the real SmolLM2 tokenizer: the persona's system prompt reaches the model in
training and chat alike, only the replies are trained, and a template's refusal is a message naming the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import main
from app.core.catalogue import CATALOGUE
from app.core.data import IGNORE_INDEX, example_segments, tokenize_conversation, with_system_prompt
from app.core.templates import ChatTemplateError, keeps_system_role, place_system_prompt, render

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
FAMILIES = sorted(path.stem for path in TEMPLATES.glob("*.json"))
# Gemma 2 refuses a system message; Mistral v0.3 shows it only inside the last user turn of a conversation that ends
# with that turn, so it vanishes from every training example.
FOLDED = {"gemma2", "mistral-v0.3"}
END_OF_TURN = {"gemma2": "<end_of_turn>", "llama3.1": "<|eot_id|>", "llama3.2": "<|eot_id|>", "mistral-v0.3": "</s>", "phi3.5": "<|end|>",
               "qwen2.5": "<|im_end|>", "smollm2": "<|im_end|>"}

SYSTEM = "You are Captain Tailor, a pirate."
CONVERSATION = [
    {"role": "user", "content": "What is rain?"},
    {"role": "assistant", "content": "Arr, water fallin' from the clouds, matey!"},
    {"role": "user", "content": "And snow?"},
    {"role": "assistant", "content": "Frozen rain, soft as a gull's feather. Yo ho!"},
]
REPLIES = [message["content"] for message in CONVERSATION if message["role"] == "assistant"]


def family_tokenizer(smollm2_folder, family: str):
    """SmolLM2's real tokenizer speaking `family`'s template, with that model's bos/eos strings and its chat markers
    as single special tokens, as they are in the model's own tokenizer."""
    from transformers import AutoTokenizer

    record = json.loads((TEMPLATES / f"{family}.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": record["special_tokens"]})
    tokenizer.chat_template = record["chat_template"]
    for name in ("bos_token", "eos_token"):
        if record[name]:
            setattr(tokenizer, name, record[name])
    return tokenizer


@pytest.fixture(params=FAMILIES)
def family(request, smollm2_folder):
    return request.param, family_tokenizer(smollm2_folder, request.param)


def test_every_catalogue_family_ships_its_template():
    families = {entry.key.split("-")[0] for entry in CATALOGUE}
    shipped = {family.split("-")[0] for family in FAMILIES}
    assert families <= shipped, f"no template shipped for {families - shipped}"
    for family in FAMILIES:
        record = json.loads((TEMPLATES / f"{family}.json").read_text())
        assert any(entry.hub_id == record["model"] for entry in CATALOGUE), record["model"]


def test_templates_that_reject_or_move_the_system_role_are_recognised(family):
    name, tokenizer = family
    assert keeps_system_role(tokenizer) == (name not in FOLDED)


def test_the_system_prompt_reaches_the_model_and_only_replies_are_trained(family):
    name, tokenizer = family
    segments = example_segments(tokenizer, CONVERSATION, SYSTEM, max_len=4096)
    everything = "".join(text for text, _ in segments)
    trained = [text for text, is_trained in segments if is_trained]
    assert everything.count(SYSTEM) == 1, "the persona's instructions are in the example exactly once"
    assert everything.index(SYSTEM) < everything.index("What is rain?")
    assert len(trained) == len(REPLIES), f"{name}: one trained run per reply, got {trained}"
    for reply, text in zip(REPLIES, trained):
        assert text.strip().startswith(reply), f"{name}: the trained run {text!r} must be the reply {reply!r}"
        leftover = text.strip()[len(reply):].strip()
        # The end-of-turn marker is learned (so the persona stops), the last reply's end-of-sequence token too where
        # the template closes the conversation with one (Phi-3.5), and nothing of the next turn.
        assert leftover in (END_OF_TURN[name], f"{END_OF_TURN[name]}\n{tokenizer.eos_token}"), \
            f"{name}: only the reply and its end-of-turn marker are trained, not {leftover!r}"
    untrained = "".join(text for text, is_trained in segments if not is_trained)
    assert SYSTEM in untrained and "What is rain?" in untrained and "And snow?" in untrained


def test_a_closing_end_of_sequence_token_stays_out_of_earlier_replies(smollm2_folder):
    """Phi-3.5's template ends every rendering with the end-of-sequence token, so a conversation cut after a reply
    and the whole conversation part inside the next turn's first characters ("<|" of both "<|endoftext|>" and
    "<|user|>"): with the markers as ordinary text (as they are for a tokenizer that lacks them) that shared "<|"
    must not be trained as part of the reply."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    tokenizer.chat_template = json.loads((TEMPLATES / "phi3.5.json").read_text())["chat_template"]
    segments = example_segments(tokenizer, CONVERSATION, SYSTEM, max_len=4096)
    trained = [text for text, is_trained in segments if is_trained]
    assert trained[0] == f"{REPLIES[0]}<|end|>\n", trained[0]


def test_chat_prompts_match_what_training_showed(family):
    """The prompt chat sends before each reply is exactly the text the trained example had before that reply."""
    name, tokenizer = family
    messages = with_system_prompt(CONVERSATION, SYSTEM)
    example, _ = tokenize_conversation(tokenizer, messages, 4096)
    trained_text = tokenizer.decode(example.input_ids)
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(tokenizer, place_system_prompt(tokenizer, messages[:index]), tokenize=False,
                            add_generation_prompt=True)
            assert trained_text.startswith(prompt), f"{name}: chat prompt before reply {index} differs from training"
            assert SYSTEM in prompt


def test_folding_puts_the_system_prompt_at_the_start_of_the_first_user_turn(smollm2_folder):
    tokenizer = family_tokenizer(smollm2_folder, "gemma2")
    folded = place_system_prompt(tokenizer, with_system_prompt(CONVERSATION, SYSTEM))
    assert folded[0] == {"role": "user", "content": f"{SYSTEM}\n\nWhat is rain?"}
    assert folded[1:] == CONVERSATION[1:]
    smollm2 = family_tokenizer(smollm2_folder, "smollm2")
    assert place_system_prompt(smollm2, with_system_prompt(CONVERSATION, SYSTEM))[0]["role"] == "system"


def test_a_template_refusal_is_a_clear_error_naming_the_model(smollm2_folder):
    tokenizer = family_tokenizer(smollm2_folder, "gemma2")
    two_users = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"},
                 {"role": "assistant", "content": "Ahoy"}]
    with pytest.raises(ChatTemplateError, match="HuggingFaceTB/SmolLM2-135M-Instruct.*alternate") as caught:
        tokenize_conversation(tokenizer, two_users, 512)
    assert "alternate user and assistant" in caught.value.hint


def test_cli_reports_a_template_refusal_without_a_traceback(tiny_base, tmp_path, capsys):
    """A dataset that Gemma 2's template refuses, checked against a base model folder that carries that template."""
    import shutil

    base = tmp_path / "gemma-templated"
    shutil.copytree(tiny_base, base)
    (base / "chat_template.jinja").write_text(json.loads((TEMPLATES / "gemma2.json").read_text())["chat_template"])
    data = tmp_path / "two-users.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Yo"},
                                             {"role": "assistant", "content": "Ahoy"}]}) + "\n")
    assert main(["data", "check", str(data), "--base", str(base)]) == 2
    err = capsys.readouterr().err
    assert "refused the conversation" in err and "roles must alternate" in err and "Traceback" not in err
    # With alternating turns the same template works, the system prompt folded into the first user turn.
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Ahoy"}]}) + "\n")
    assert main(["data", "check", str(data), "--base", str(base), "--system", "You are a pirate."]) == 0
    assert "1 usable" in capsys.readouterr().out


def test_labels_are_ignore_index_outside_replies(family):
    name, tokenizer = family
    example, length = tokenize_conversation(tokenizer, with_system_prompt(CONVERSATION, SYSTEM), 4096)
    trained = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert 0 < len(trained) < length
    assert tokenizer.decode(trained).count("Arr, water") == 1
