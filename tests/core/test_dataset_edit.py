"""Dataset editing helpers: token lengths, exact and near duplicates, filters, the too-few warning, atomic saving."""

from __future__ import annotations

import json
import os

import pytest

from app.core.data import load_dataset_file, tokenize_conversation, with_system_prompt
from app.core.dataset_edit import (
    analyse, append_example, atomic_write_text, find_duplicates, sample_dataset_sizes, save_chat_jsonl,
    token_lengths, too_few_warning,
)
from app.core.errors import DatasetError


def chat(user: str, reply: str | None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": user}]
    return messages + ([{"role": "assistant", "content": reply}] if reply is not None else [])


def test_exact_and_near_duplicates_point_at_the_first_copy_and_distinct_rows_stay():
    rows = [chat("Hi there, how are you doing today?", "Fine thanks, and you my friend?"),
            chat("What is the capital of France?", "Paris."),
            chat("hi there how are you doing today", "Fine, thanks! And you, my friend?"),   # case and punctuation
            chat("Hi there, how are you doing today??", "Fine thanks, and you my dear friend?"),  # one word more
            chat("What is the capital of Spain?", "Madrid."),
            chat("What is the capital of France?", "Paris.")]
    assert find_duplicates(rows) == [None, None, 0, 0, None, 1]
    # Without near matching only rows with the same words (ignoring case and punctuation) count.
    assert find_duplicates(rows, near=False) == [None, None, 0, None, None, 1]


def test_near_duplicate_search_scales_to_50000_rows():
    import time

    rows = [chat(f"Question number {i} about topic {i % 97}", f"Answer {i * 7919 % 10007} in words") for i in range(50_000)]
    rows += rows[:10]
    started = time.perf_counter()
    found = find_duplicates(rows)
    assert found[-10:] == list(range(10))
    assert time.perf_counter() - started < 120  # generous: a loaded 2-core machine; it is a worker-thread job


def test_token_lengths_match_what_training_counts(tiny_base):
    from app.core.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_base)
    rows = [chat("Hello", "Ahoy!"), chat("A longer question " * 20, "A longer answer " * 30), chat("No reply", None)]
    lengths = token_lengths(tokenizer, rows, "You are a pirate.", batch=2)
    expected = [tokenize_conversation(tokenizer, with_system_prompt(m, "You are a pirate."), 10_000)[1] for m in rows]
    assert lengths == expected and lengths[1] > lengths[0]


def test_analyse_filters_rows_and_warns_with_the_samples_numbers():
    rows = [chat("a", "b"), chat("no reply here", None), chat("a", "b"), chat("long", "x " * 50)]
    report = analyse(rows, [10, 8, 10, 300], max_len=128)
    assert report.rows_for("no_reply") == [1] and report.rows_for("too_long") == [3]
    assert report.rows_for("duplicates") == [2] and report.rows_for("all") is None
    assert report.usable == 2
    text = report.to_text()
    assert "1 example(s) have no assistant reply" in text and "longer than the max length (128)" in text
    assert "Only 2 example(s) left: the sample personas needed 60 to 199" in text and "haiku.csv 60" in text


def test_sample_sizes_are_counted_from_the_shipped_files():
    sizes = sample_dataset_sizes()
    assert sizes == {"butler.jsonl": 120, "cowboy.jsonl": 199, "pirate.jsonl": 160, "haiku.csv": 60}
    assert too_few_warning(60) is None and too_few_warning(59) is not None


def test_save_writes_chat_jsonl_that_the_loader_reads_back(tmp_path):
    rows = [chat("Hello", "Ahoy!"), chat("Ünïcode 🎉", "Sí")]
    path = save_chat_jsonl(tmp_path / "out.jsonl", rows)
    assert load_dataset_file(path).conversations == rows
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_a_failed_save_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_text("old\n")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"], "no temporary file left behind"


def test_save_into_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        save_chat_jsonl(tmp_path / "nope" / "out.jsonl", [chat("a", "b")])


def test_append_adds_a_line_and_refuses_files_that_are_not_chat_jsonl(tmp_path):
    path = tmp_path / "corrected.jsonl"
    append_example(path, {"messages": chat("one", "1")})
    append_example(path, {"messages": chat("two", "2")})
    assert [json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines()] == ["one", "two"]
    table = tmp_path / "table.jsonl"
    table.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(DatasetError, match="table.jsonl line 1 has no 'messages'"):
        append_example(table, {"messages": chat("x", "y")})
    assert table.read_text() == '{"prompt": "a", "response": "b"}\n'
