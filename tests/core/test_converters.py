"""Converters from chat exports to persona examples, on fixture files written in each app's real export format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.core.converters import (
    ExportError, conversation_example, convert_export, drop_reason, guess_source, merge_turns, speakers_in,
    split_conversations, ChatMessage,
)
from app.core.converters.whatsapp import read_messages as read_whatsapp
from app.core.converters import ConversionReport

EXPORTS = Path(__file__).resolve().parents[1] / "fixtures" / "exports"


def roles(example: dict) -> list[str]:
    return [message["role"] for message in example["messages"]]


def all_text(conversion) -> str:
    return json.dumps(conversion.examples, ensure_ascii=False)


def test_whatsapp_android_us_format_merges_turns_splits_on_silence_and_drops_system_lines():
    conversion = convert_export(EXPORTS / "whatsapp_android_us.txt", "whatsapp", "Sam")
    report = conversion.report
    assert report.dropped == {"system line": 1, "media only": 2, "links only": 1, "deleted": 1}
    # Three conversations (6:02 PM, the next evening, the morning of Jan 2): the last has no reply from Sam.
    assert report.conversations == 3 and report.examples == 2 and report.conversations_without_persona == 1
    first = conversion.examples[0]["messages"]
    assert roles(conversion.examples[0]) == ["user", "assistant", "user", "assistant"]
    # Two consecutive messages of Maya, and Sam's multi-line message plus the next one, are one turn each.
    assert first[0]["content"] == "Hey Sam! Are you still coming to the climbing gym tomorrow?\nJordan said he might join too"
    assert first[1]["content"] == "Absolutely, wouldn't miss it.\nI'll bring the spare chalk bag\nWhat time works for you?"
    text = all_text(conversion)
    assert "<This message was edited>" not in text and "Three unread on the nightstand right now." in text


def test_anonymising_is_on_by_default_and_replaces_names_and_phone_numbers():
    conversion = convert_export(EXPORTS / "whatsapp_android_us.txt", "whatsapp", "Sam")
    text = all_text(conversion)
    assert "Maya" not in text and "415 555" not in text
    assert "See you there Person 1!" in text and "[phone]" in text
    assert conversion.report.placeholders == {"Maya Lopez": "Person 1", "+1 415 555 0199": "Person 2"}
    # Three people in the second conversation: each user line says who wrote it (as a placeholder).
    assert conversion.examples[1]["messages"][4]["content"].startswith("Person 2: Hi, is this Sam?")

    plain = convert_export(EXPORTS / "whatsapp_android_us.txt", "whatsapp", "Sam", anonymise=False)
    assert "See you there Maya!" in all_text(plain) and "+1 415 555 0132" in all_text(plain)
    assert plain.report.placeholders == {}


def test_whatsapp_ios_bracketed_24h_format_drops_notices_under_the_chat_name_and_attachments():
    conversion = convert_export(EXPORTS / "whatsapp_ios_24h.txt", "whatsapp", "sam")  # case does not matter
    report = conversion.report
    assert report.persona == "Sam"
    assert "Climbing crew" not in report.speakers, "iOS notices are written under the group's name"
    assert report.dropped == {"system line": 2, "media only": 2}
    # 31/12 21:45 → 01/01 13:02 is a silence over 6 hours: two conversations.
    assert report.examples == 2
    assert conversion.examples[1]["messages"] == [
        {"role": "user", "content": "Happy new year all 🎉"},
        {"role": "assistant", "content": "Happy new year! Hope nobody is too sore from yesterday"}]


def test_gap_hours_decides_where_a_conversation_ends():
    one = convert_export(EXPORTS / "whatsapp_ios_24h.txt", "whatsapp", "Sam", gap_hours=24)
    assert one.report.conversations == 1 and one.report.examples == 1


def test_date_order_is_worked_out_from_the_file():
    # 12/31/23 can only be month first; 31/12/2023 only day first; German 28.12.23 day first.
    us = read_whatsapp(EXPORTS / "whatsapp_android_us.txt", ConversionReport("", "whatsapp", "Sam"))
    assert us[-1].time.isoformat() == "2024-01-02T08:16:00"
    ios = read_whatsapp(EXPORTS / "whatsapp_ios_24h.txt", ConversionReport("", "whatsapp", "Sam"))
    assert ios[0].time.isoformat() == "2023-12-31T21:41:05"


def test_german_export_drops_its_localised_media_deleted_and_system_lines():
    conversion = convert_export(EXPORTS / "whatsapp_german.txt", "whatsapp", "Oma Hilde")
    assert conversion.report.dropped == {"system line": 1, "media only": 1, "deleted": 1}
    assert conversion.report.examples == 2
    assert "Medien" not in all_text(conversion) and "gelöscht" not in all_text(conversion)


def test_export_in_an_unknown_layout_names_the_file_line_and_what_to_do():
    with pytest.raises(ExportError) as caught:
        convert_export(EXPORTS / "whatsapp_korean.txt", "whatsapp", "민준")
    message = str(caught.value)
    assert "whatsapp_korean.txt line 1" in message and "Export chat" in message and "--from transcript" in message


def test_truncated_whatsapp_export_keeps_what_is_whole_and_says_where_it_was_cut():
    conversion = convert_export(EXPORTS / "whatsapp_truncated.txt", "whatsapp", "Sam")
    assert conversion.report.examples == 1
    assert any("whatsapp_truncated.txt line 5 looks cut off" in note for note in conversion.report.notes)


def test_persona_who_never_speaks_lists_the_names_that_do():
    with pytest.raises(ExportError) as caught:
        convert_export(EXPORTS / "whatsapp_android_us.txt", "whatsapp", "Bob")
    message = str(caught.value)
    assert "'Bob' never speaks" in message and "Maya Lopez (9)" in message and "Sam (7)" in message


def test_group_with_hundreds_of_members_keeps_only_the_context_of_each_reply():
    conversion = convert_export(EXPORTS / "whatsapp_large_group.txt", "whatsapp", "Coach Rui")
    report = conversion.report
    assert len(report.speakers) > 300
    assert report.examples == 28 and any("whatsapp_large_group.txt: " in note and "people write in this chat" in note
                                       for note in report.notes)
    for example in conversion.examples:
        for message in example["messages"]:
            if message["role"] == "user":
                assert message["content"].count("\n") < 4, "at most 4 messages of context before each reply"
    with pytest.raises(ExportError) as caught:
        convert_export(EXPORTS / "whatsapp_large_group.txt", "whatsapp", "Nobody")
    assert "and " in str(caught.value) and "more" in str(caught.value), "a long list of speakers is cut short"


def test_telegram_text_as_string_or_entity_list_and_media_and_service_dropped():
    conversion = convert_export(EXPORTS / "telegram_result.json", "telegram", "Nadia Petrova")
    report = conversion.report
    assert report.dropped == {"media only": 2, "system line": 1}
    assert conversion.examples[0]["messages"][0]["content"] == (
        "I did! The booster landing was perfect. Replay here: https://video.example.org/launch")
    # Ivan answers Nadia's second message but she never replies: no example from that conversation.
    assert report.examples == 1 and report.conversations_without_persona == 1
    ivan = convert_export(EXPORTS / "telegram_result.json", "telegram", "Ivan")
    assert "Call me at [phone] if anything changes." in all_text(ivan)


def test_truncated_telegram_json_names_the_line_where_it_ends():
    with pytest.raises(ExportError) as caught:
        convert_export(EXPORTS / "telegram_truncated.json", "telegram", "Ivan")
    assert "telegram_truncated.json line" in str(caught.value) and "cut off" in str(caught.value)


def test_discord_export_by_nickname_or_account_name():
    conversion = convert_export(EXPORTS / "discord_export.json", "discord", "kira.dev")
    assert conversion.report.persona == "Kira"
    assert conversion.report.dropped == {"system line": 2, "media only": 1}
    first = conversion.examples[0]["messages"]
    assert roles(conversion.examples[0]) == ["user", "assistant", "user", "assistant"]
    assert first[1]["content"].endswith("Never touch widgets from the worker itself.")
    assert "Person 2: @Kira she's calling run() directly" in first[2]["content"]


def test_transcript_of_two_people_becomes_conversations_split_at_scene_breaks():
    conversion = convert_export(EXPORTS / "transcript_chat.txt", "transcript", "Theo")
    assert [len(example["messages"]) for example in conversion.examples] == [6, 2]


def test_script_dialogue_pairs_each_line_of_the_character_with_the_line_before():
    conversion = convert_export(EXPORTS / "script_hamlet.txt", "transcript", "HAMLET", anonymise=False)
    assert all(roles(example) == ["user", "assistant"] for example in conversion.examples)
    pairs = [(e["messages"][0]["content"], e["messages"][1]["content"]) for e in conversion.examples]
    assert ("How is it that the clouds still hang on you?", "Not so, my lord; I am too much in the sun.") in pairs
    assert ("Mark me.", "I will.") in pairs
    # The stage directions in brackets are gone, and so is the aside marker.
    assert conversion.report.dropped["stage direction"] == 2
    assert pairs[0][1] == "A little more than kin, and less than kind."
    # A wrapped speech is one line of dialogue.
    assert any(user.startswith("Good Hamlet, cast thy nighted colour off, And let thine eye") for user, _ in pairs)


def test_transcript_without_names_says_which_line_is_wrong(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("My favourite quotes\nAlice: hi\n", encoding="utf-8")
    with pytest.raises(ExportError, match="notes.txt line 1: expected 'Name: what they said'"):
        convert_export(bad, "transcript", "Alice")


def test_not_utf8_and_empty_files_are_named(tmp_path):
    latin = tmp_path / "chat.txt"
    latin.write_bytes("12/30/23, 6:02 PM - Ren\xe9: bonjour\n".encode("latin-1"))
    with pytest.raises(ExportError, match="chat.txt line 1: not UTF-8"):
        convert_export(latin, "whatsapp", "René")
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(ExportError, match="empty.json is empty"):
        convert_export(empty, "telegram", "x")


@pytest.mark.parametrize("text,reason", [
    ("<Media omitted>", "media only"), ("\u200eimage omitted", "media only"),
    ("\u200e<attached: 00000012-PHOTO-2023-12-31.jpg>", "media only"), ("This message was deleted", "deleted"),
    ("https://example.com/a https://example.com/b", "links only"), ("   ", "empty"),
    ("look: https://example.com", None), ("<3 you too", None)])
def test_drop_reasons(text, reason):
    assert drop_reason(text) == reason


def test_consecutive_messages_merge_and_trailing_prompt_without_reply_is_cut():
    messages = [ChatMessage(speaker, text, None, "line 1") for speaker, text in
                [("A", "hi"), ("A", "you there?"), ("P", "yes"), ("A", "great"), ("P", "!"), ("A", "bye")]]
    turns = merge_turns(messages)
    assert turns[0] == ("A", "hi\nyou there?")
    assert conversation_example(turns, "P", name_others=False) == [
        {"role": "user", "content": "hi\nyou there?"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "great"}, {"role": "assistant", "content": "!"}]
    # The persona opening a conversation has nothing to answer: the example starts at the first prompt.
    assert conversation_example([("P", "morning"), ("A", "hi")], "P", False) is None
    assert len(list(split_conversations(messages, __import__("datetime").timedelta(hours=6)))) == 1


def test_speakers_and_source_guess_for_the_gui():
    assert speakers_in(EXPORTS / "discord_export.json", "discord").most_common(1)[0][0] == "Kira"
    assert guess_source(EXPORTS / "whatsapp_ios_24h.txt") == "whatsapp"
    assert guess_source(EXPORTS / "discord_export.json") == "discord"
    assert guess_source(EXPORTS / "telegram_result.json") == "telegram"
    assert guess_source(EXPORTS / "script_hamlet.txt") == "transcript"


# The command line and the round trip: export → `tailor data convert` → `tailor data check` → a few training steps.

def test_cli_convert_writes_chat_jsonl_and_reports_what_was_kept(tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "sam.jsonl"
    assert main(["data", "convert", str(EXPORTS / "whatsapp_android_us.txt"), "--from", "whatsapp",
                 "--persona", "Sam", "--out", str(out), "--gap-hours", "6"]) == 0
    printed = capsys.readouterr().out
    assert "13 kept" in printed and "2 media only" in printed and f"Wrote 2 example(s)" in printed
    assert "the sample personas needed 60" in printed
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and all(set(row) == {"messages"} for row in rows)

    plain = tmp_path / "plain.jsonl"
    assert main(["data", "convert", str(EXPORTS / "whatsapp_android_us.txt"), "--from", "whatsapp",
                 "--persona", "Sam", "--out", str(plain), "--no-anonymise"]) == 0
    assert "Maya" in plain.read_text(encoding="utf-8") and "Maya" not in out.read_text(encoding="utf-8")


def test_cli_convert_exit_2_lists_who_speaks_and_writes_nothing(tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "bob.jsonl"
    assert main(["data", "convert", str(EXPORTS / "telegram_result.json"), "--from", "telegram",
                 "--persona", "Bob", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "'Bob' never speaks" in error and "Nadia Petrova" in error and "Ivan" in error and "Traceback" not in error
    assert not out.exists()
    assert main(["data", "convert", str(EXPORTS / "telegram_truncated.json"), "--from", "telegram",
                 "--persona", "Ivan", "--out", str(out)]) == 2
    assert "telegram_truncated.json line" in capsys.readouterr().err and not out.exists()


def test_cli_convert_default_output_sits_beside_the_export(tmp_path, capsys):
    from app.cli import main

    export = tmp_path / "chat.txt"
    export.write_bytes((EXPORTS / "whatsapp_german.txt").read_bytes())
    assert main(["data", "convert", str(export), "--from", "whatsapp", "--persona", "Oma Hilde"]) == 0
    assert (tmp_path / "chat.Oma-Hilde.jsonl").is_file()


def test_round_trip_export_to_check_to_training(tiny_base, tmp_path, capsys):
    """A converted WhatsApp chat is read by `tailor data check` and trains a few steps on the tiny model."""
    from app.cli import main
    from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
    from app.core.library import Library
    from app.core.training import run_training

    out = tmp_path / "oma.jsonl"
    assert main(["data", "convert", str(EXPORTS / "whatsapp_german.txt"), "--from", "whatsapp",
                 "--persona", "Oma Hilde", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(out), "--base", str(tiny_base), "--max-len", "128"]) == 0
    checked = capsys.readouterr().out
    assert "Format: openai" in checked and "Rows: 2 (2 usable)" in checked

    config = RunConfig(name="oma", system_prompt="Du bist Oma Hilde.", model=ModelSource(base=str(tiny_base), quant="4bit"),
                       data=DataSettings(path=str(out), max_len=128), lora=LoraSettings(rank=4, alpha=8),
                       training=TrainingSettings(max_steps=2, batch_size=2, learning_rate=5e-3, checkpoint_every=2))
    result = run_training(config, Library(tmp_path / "lib"))
    assert result.steps == 2
    manifest = json.loads((result.adapter.path / "tailor.json").read_text())
    assert manifest["dataset"]["rows"] == 2


@pytest.mark.parametrize("lines,expected_first", [
    # Swedish Android: year first, 24-hour clock.
    (["2023-12-31 21:41 - Anna: Gott nytt år!", "2023-12-31 21:43 - Erik: Detsamma!"], "2023-12-31T21:41:00"),
    # Spanish Android: day first, "p. m." for the afternoon.
    (["31/12/23, 9:41 p. m. - Ana: ¡Feliz año!", "31/12/23, 9:43 p. m. - Erik: ¡Igualmente!"], "2023-12-31T21:41:00"),
    # Japanese iOS: year first with slashes, seconds, brackets.
    (["[2023/12/31 21:41:05] Ana: あけましておめでとう", "[2023/12/31 21:43:00] Erik: おめでとう"], "2023-12-31T21:41:05"),
])
def test_other_locales_date_layouts(tmp_path, lines, expected_first):
    export = tmp_path / "chat.txt"
    export.write_text("\n".join(lines) + "\n", encoding="utf-8")
    messages = read_whatsapp(export, ConversionReport(str(export), "whatsapp", "Erik"))
    assert messages[0].time.isoformat() == expected_first and messages[1].speaker == "Erik"
    conversion = convert_export(export, "whatsapp", "Erik", anonymise=False)
    assert [m["role"] for m in conversion.examples[0]["messages"]] == ["user", "assistant"]


def test_a_date_that_fits_no_order_names_its_line(tmp_path):
    export = tmp_path / "chat.txt"
    export.write_text("13/12/23, 21:41 - Ana: hi\n12/31/23, 21:42 - Erik: hello\n", encoding="utf-8")
    with pytest.raises(ExportError, match=r"chat.txt line 2: the date '12/31/23' does not read as d/m/y"):
        convert_export(export, "whatsapp", "Erik")
