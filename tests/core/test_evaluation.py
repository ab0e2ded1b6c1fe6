"""The report card: the judges on real texts, the card's data on a tiny model, and its numbers on the real SmolLM2."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.core.chat import BASE, ChatSession, GenerationSettings, base_for
from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
from app.core.errors import TailorError
from app.core.evaluation import (
    CARD_KEY, EvaluationStopped, KnowledgeQuestion, ReportCard, SignatureWords, StyleJudge, TopicJudge, answer_together,
    card_settings, evaluate_adapter, held_out_prompts, knowledge_questions, loops, plan_card, prompts_from_file,
    repeated_phrase, save_report_card, saved_report_card, words,
)
from app.core.library import Library
from app.core.training import run_training
from report_cards import RECORDED_PIRATE_CARD

DATASETS = Path(__file__).resolve().parents[2] / "resources" / "datasets"


def replies_of(name: str) -> list[str]:
    rows = [json.loads(line) for line in (DATASETS / name).read_text().splitlines() if line.strip()]
    return [message["content"] for row in rows for message in row["messages"] if message["role"] == "assistant"]


# Loops


@pytest.mark.parametrize("text", [
    "Arr, matey! Arr, matey! Arr, matey! Arr, matey!",
    "Well, partner, partner, partner, partner, partner, partner",
    "The sky is blue because of light. The sky is blue because of light. The sky is blue because of light.",
    # A loop that varies one word each time: caught by the repeated 4-gram share, not by an exact run.
    " ".join(f"and then the ship sailed on to the {place} port and then the ship sailed on to the next port"
             for place in ("north", "south", "east", "west")),
])
def test_looping_replies_are_caught(text):
    assert loops(text)


@pytest.mark.parametrize("text", replies_of("pirate.jsonl")[:40] + [
    "Ha ha, that is funny.", "No, no, no: turn left first, then right.", "",
])
def test_clean_replies_do_not_count_as_loops(text):
    assert not loops(text), repeated_phrase(text)


# On topic


def test_topic_judge_on_the_real_base_credits_answers_and_catches_swapped_ones(smollm2_folder):
    """Pirate replies written for the sample dataset, judged by the real SmolLM2: each reply ranks its own question
    first among eight, though many share no word with it ("Arr, 'tis the sun…"); the same replies given to the
    wrong questions do not."""
    prompts = [prompt for prompt in prompts_from_file(DATASETS / "pirate.jsonl") if len(prompt.messages) == 1][:8]
    judge = TopicJudge(ChatSession(str(smollm2_folder), "none"), [prompt.messages for prompt in prompts])
    answered = [judge.on_topic(index, prompt.reference) for index, prompt in enumerate(prompts)]
    swapped = [judge.on_topic(index, prompts[(index + 1) % len(prompts)].reference) for index in range(len(prompts))]
    assert sum(answered) >= 7, answered
    assert sum(swapped) <= 1, swapped
    assert judge.on_topic(0, "") is False


def test_many_questions_are_scored_a_slice_at_a_time_with_the_same_result(tiny_base, monkeypatch):
    import app.core.evaluation as evaluation

    session = ChatSession(str(tiny_base), "none")
    questions = [[{"role": "user", "content": f"Question number {index}: why is the sky blue?"}] for index in range(7)]
    reply = session.tokenizer("Because air scatters blue light the most.", add_special_tokens=False)["input_ids"]
    whole = TopicJudge(session, questions).log_likelihoods(reply)
    monkeypatch.setattr(evaluation, "_RELEVANCE_ROWS", 3)
    sliced = TopicJudge(session, questions).log_likelihoods(reply)
    assert len(sliced) == 7 and sliced == pytest.approx(whole, abs=1e-3)


def test_a_topic_needs_other_questions_to_be_judged_against(tiny_base):
    judge = TopicJudge(ChatSession(str(tiny_base), "none"), [[{"role": "user", "content": "Why is the sky blue?"}]])
    assert judge.on_topic(0, "Because air scatters blue light the most.") is None


# Knowledge


def test_knowledge_answers_are_scored_by_whole_keywords():
    question = KnowledgeQuestion("How many legs does a spider have?", ("eight", "8"))
    assert question.answered_by("A spider has 8 legs.") and question.answered_by("Eight, matey!")
    assert not question.answered_by("It has 18 legs, weighing eighteen grams.")


def test_shipped_knowledge_questions_are_well_formed():
    questions = knowledge_questions()
    assert 8 <= len(questions) <= 12
    assert all(question.question.endswith("?") and question.accept for question in questions)
    # A question the sample personas were trained on would test their training data, not what the base knew.
    def plain(text: str) -> str:
        return " ".join(words(text.replace("'s ", " is ")))

    asked_in_training = {plain(prompt.question) for name in ("pirate.jsonl", "butler.jsonl", "haiku.csv", "cowboy.jsonl")
                         for prompt in prompts_from_file(DATASETS / name)}
    for question in questions:
        assert plain(question.question) not in asked_in_training, question


# Style


def test_style_judge_tells_a_persona_from_another_voice():
    """Pirate training replies as the persona, butler replies standing in for 'the base': unseen pirate replies
    are in style, unseen butler replies are not."""
    pirate, butler = replies_of("pirate.jsonl"), replies_of("butler.jsonl")
    judge = StyleJudge(pirate[:120], butler[:24])
    assert sum(judge.in_style(text) for text in pirate[120:150]) >= 27
    assert sum(judge.in_style(text) for text in butler[60:90]) <= 9


def test_signature_words_are_the_personas_habits_not_common_words():
    """Against butler replies standing in for the base: the cowboy's and the pirate's verbal habits, no function
    words, and none for haiku, whose style is a form."""
    butler = replies_of("butler.jsonl")[:24]
    cowboy = SignatureWords(replies_of("cowboy.jsonl")[:120], butler).words
    pirate = SignatureWords(replies_of("pirate.jsonl")[:120], butler).words
    assert {"partner", "reckon", "y'all"} <= cowboy and {"matey", "arr", "ye"} <= pirate
    assert not (cowboy | pirate) & {"the", "and", "you", "is", "a", "to"}
    haiku = [row["response"] for row in csv.DictReader((DATASETS / "haiku.csv").open(encoding="utf-8"))]
    assert not SignatureWords(haiku, butler).words


def test_a_base_reply_that_slips_into_the_voice_counts_for_the_base():
    """The base given the persona's system prompt sometimes plays along ("I reckon…"): that reply passes the
    signature test too, which is why the card shows the base's own score as the floor."""
    cowboy, butler = replies_of("cowboy.jsonl"), replies_of("butler.jsonl")[:24]
    judge = StyleJudge(cowboy[:120], [*butler, "Well, I reckon the market is where folks trade, partner."])
    assert judge.signature.used("I reckon it is so, partner.") == ["partner", "reckon"]
    assert judge.in_style("Stocks are shares of a company, partner.")
    assert not judge.in_style("Stocks are shares of a company, sold on an exchange.")


@pytest.mark.parametrize("persona, base, unseen", [(0, 1, 2), (1, 2, 0), (2, 0, 1)])
@pytest.mark.parametrize("voice", ["butler.jsonl", "pirate.jsonl"])
def test_style_judge_gives_little_credit_when_persona_and_base_talk_alike(voice, persona, base, unseen):
    """Base vs base: when the 'persona' talks exactly like the base (three disjoint samples of one voice), few of
    its replies count as in style; about one in ten by construction."""
    replies = replies_of(voice)
    judge = StyleJudge(replies[persona::3], replies[base::3][:20])
    scored = [judge.in_style(text) for text in replies[unseen::3]]
    assert sum(scored) <= 0.4 * len(scored)


# Prompts


def test_prompts_from_text_lines_and_from_a_chat_dataset(tmp_path):
    lines = tmp_path / "questions.txt"
    lines.write_text("What is rain?\n\n  Name a planet.  \n")
    assert [prompt.question for prompt in prompts_from_file(lines)] == ["What is rain?", "Name a planet."]

    prompts = prompts_from_file(DATASETS / "pirate.jsonl")
    multi_turn = next(prompt for prompt in prompts if len(prompt.messages) > 1)
    assert multi_turn.messages[-1]["role"] == "user" and multi_turn.reference
    assert all(message["role"] != "system" for prompt in prompts for message in prompt.messages)


def test_a_missing_prompts_file_is_a_clear_error(tmp_path):
    with pytest.raises(TailorError, match="does not exist"):
        prompts_from_file(tmp_path / "nope.txt")


def test_held_out_prompts_are_the_recorded_split_else_the_last_tenth(tmp_path):
    from app.core.data import load_dataset_file
    from app.core.heldout import split_rows, write_heldout
    from app.core.library import AdapterEntry

    entry = AdapterEntry("p", tmp_path, {}, None, 0)
    loaded = load_dataset_file(DATASETS / "pirate.jsonl")
    prompts, source = held_out_prompts(entry, loaded.conversations)
    assert len(prompts) == 12 and prompts[-1].reference == loaded.conversations[-1][-1]["content"]
    assert source.startswith("last 12 of 160 training examples")

    _, held = split_rows(loaded, 0.05, seed=1)
    write_heldout(tmp_path, held)
    prompts, source = held_out_prompts(entry, loaded.conversations)
    assert [prompt.reference for prompt in prompts] == [conversation[-1]["content"] for conversation in held.conversations]
    assert source == "8 of 8 held-out examples (never trained on)"


def test_without_a_split_or_the_data_the_card_asks_for_prompts(tmp_path):
    from app.core.library import AdapterEntry

    with pytest.raises(TailorError, match="no recorded held-out") as raised:
        held_out_prompts(AdapterEntry("p", tmp_path, {}, None, 0), [])
    assert "--prompts" in raised.value.hint


# The card on a tiny model


def tiny_persona(tiny_base: Path, data: Path, library: Library, name: str = "tiny") -> None:
    run_training(RunConfig(name=name, system_prompt="You are a pirate.", model=ModelSource(base=str(tiny_base), quant="4bit"),
                           data=DataSettings(path=str(data), max_len=128), lora=LoraSettings(rank=4, alpha=8),
                           training=TrainingSettings(max_steps=2, batch_size=4, learning_rate=5e-3)), library)


def test_card_on_a_tiny_model_is_saved_in_the_manifest_and_reproducible(tiny_base, chat_jsonl, tmp_path):
    library = Library(tmp_path / "lib")
    tiny_persona(tiny_base, chat_jsonl, library)
    session = ChatSession(str(tiny_base), "4bit")
    messages: list[str] = []
    card = evaluate_adapter(session, library.get("tiny"), plan_card(library, library.get("tiny")), progress=messages.append)

    assert card.adapter == "tiny" and card.system_prompt == "You are a pirate."
    assert len(card.replies) == 2 and card.prompt_source.startswith("last 2 of 16 training examples")
    assert len(card.knowledge) == len(knowledge_questions())
    assert card.base_loss > 0 and card.persona_loss > 0 and card.loss_tokens > 0
    assert card.base_loss != card.persona_loss  # the adapter changed something
    assert "seed 0" in card.settings or "greedy" in card.settings
    assert any(message.startswith("Replies: ") for message in messages)

    saved = save_report_card(library, "tiny", card)
    assert saved.manifest[CARD_KEY]["adapter"] == "tiny" and saved.manifest["kind"] == "trained"
    assert saved_report_card(library.get("tiny")) == card
    assert card.summary().startswith("style ") and "· loops " in card.summary() and "(base " in card.summary()

    again = evaluate_adapter(session, library.get("tiny"), plan_card(library, library.get("tiny")))
    assert [pair.persona for pair in again.replies] == [pair.persona for pair in card.replies]


def test_replies_decoded_together_are_the_ones_chat_gives_alone(tiny_base, chat_jsonl, tmp_path):
    """The card decodes its replies in one batch, base and persona rows side by side; each is still the reply
    `tailor chat` gives for that persona and seed, sampled or greedy. (On the real SmolLM2, a default card's 44
    replies came out identical both ways.)"""
    library = Library(tmp_path / "lib")
    tiny_persona(tiny_base, chat_jsonl, library)
    session = ChatSession(str(tiny_base), "none")
    persona = session.load_adapter(library.get("tiny"))
    sampled, greedy = card_settings(GenerationSettings(), 24), GenerationSettings(temperature=0, max_new_tokens=24)
    asked = [([{"role": "user", "content": question}], choice, settings)
             for question in ("What is rain?", "Name a planet.", "Why is the sky blue?")
             for choice in (BASE, persona) for settings in (sampled, greedy)]
    together = answer_together(session, asked)
    # The tiny model's random tokens can end on half a character at the length limit: chat shows it as U+FFFD,
    # the batch (the server's engine) leaves it out.
    assert together == [session.reply(messages, choice, settings).rstrip("\ufffd") for messages, choice, settings in asked]
    assert len(set(together)) > 2  # the personas and the settings made different replies


def test_stopping_the_card_ends_its_replies(tiny_base):
    session = ChatSession(str(tiny_base), "none")
    stop = threading.Event()
    stop.set()
    with pytest.raises(EvaluationStopped):
        answer_together(session, [([{"role": "user", "content": "Tell me a long story."}], BASE,
                                   GenerationSettings(max_new_tokens=2000))] * 3, stop)


def test_eval_command_prints_the_card_and_json(tiny_base, chat_jsonl, tmp_path):
    library = Library(tmp_path / "lib")
    tiny_persona(tiny_base, chat_jsonl, library)
    questions = tmp_path / "questions.txt"
    questions.write_text("What is the sun?\nName a planet.\n")
    env = {**__import__("os").environ, "TAILOR_HOME": str(library.root)}
    # The tiny adapter records its base as a folder path, so `eval` opens the same tiny model.
    done = subprocess.run([sys.executable, "-m", "app.cli", "eval", "tiny", "--prompts", str(questions), "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    card = ReportCard.from_dict(json.loads(done.stdout))
    assert [pair.question for pair in card.replies] == ["What is the sun?", "Name a planet."]
    assert card.base_loss is None  # plain questions carry no reference reply
    assert library.get("tiny").manifest[CARD_KEY]["prompt_source"] == "questions.txt"

    assert "Summary: style" in card.to_text() and "[2] Name a planet." in card.to_text()

    missing = subprocess.run([sys.executable, "-m", "app.cli", "eval", "nobody"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "No adapter named 'nobody'" in missing.stderr
    bad = subprocess.run([sys.executable, "-m", "app.cli", "eval", "tiny", "--prompts", str(tmp_path / "gone.txt")],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "gone.txt does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_the_card_travels_in_a_bundle(tiny_base, chat_jsonl, tmp_path):
    from app.core.export import export_adapter
    from app.core.importer import import_adapter

    library = Library(tmp_path / "lib")
    tiny_persona(tiny_base, chat_jsonl, library)
    session = ChatSession(str(tiny_base), "4bit")
    card = evaluate_adapter(session, library.get("tiny"), plan_card(library, library.get("tiny"), _one_question(tmp_path)),
                            knowledge=knowledge_questions()[:1])
    save_report_card(library, "tiny", card)
    bundle = export_adapter(library, "tiny", "bundle", tmp_path / "tiny.tailor")
    other = Library(tmp_path / "other")
    imported = import_adapter(other, bundle, base=str(tiny_base))
    assert saved_report_card(imported) == card


def _one_question(tmp_path: Path) -> Path:
    path = tmp_path / "one.txt"
    path.write_text("What is the sun?\n")
    return path


# The card's numbers on the real bundled model


@pytest.mark.slow
def test_real_pirate_persona_beats_the_base_on_style(smollm2_folder, tmp_path):
    """A briefly trained pirate on the real SmolLM2, asked questions it never saw, at chat's own precision and
    default decoding: its replies read as pirate more often than the base's, and its held-out loss is lower. A short
    prompt set and the card's reply cap keep it to a few minutes on a CPU."""
    lines = (DATASETS / "pirate.jsonl").read_text().splitlines()
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    train.write_text("\n".join(lines[:-6]) + "\n")
    held_out.write_text("\n".join(lines[-6:]) + "\n")
    library = Library(tmp_path / "lib")
    run_training(RunConfig(name="pirate", system_prompt="You are a pirate captain.",
                           data=DataSettings(path=str(train), max_len=192), lora=LoraSettings(rank=16, alpha=32),
                           training=TrainingSettings(max_steps=30, batch_size=4, learning_rate=1e-3)), library)
    entry = library.get("pirate")
    session = ChatSession(*base_for([entry], None, None))
    card = evaluate_adapter(session, entry, plan_card(library, entry, held_out))
    print(card.to_text())
    # Kept for the docs (and the report card screenshot) when asked, like the screenshots: a test run leaves the
    # tracked files alone.
    if os.environ.get("TAILOR_SCREENSHOTS"):
        RECORDED_PIRATE_CARD.write_text(json.dumps(card.to_dict(), indent=2, ensure_ascii=False) + "\n")

    assert card.style().hits > card.style("base").hits
    assert card.style().hits >= card.style().total // 2
    assert card.persona_loss < card.base_loss
    assert card.knowledge_score("base").hits >= len(card.knowledge) // 2
