"""Dataset loading, validation messages and assistant-only masking, on real files and SmolLM2's real tokenizer."""

from __future__ import annotations

import json

import pytest

from app.core.data import (
    IGNORE_INDEX, build_report, example_segments, load_dataset_file, measure_dataset, tokenize_conversation,
    tokenize_dataset,
)
from app.core.errors import DatasetError


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    from app.core.models import load_tokenizer

    return load_tokenizer(smollm2_folder)


def write_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"}]}


def test_detects_openai_sharegpt_alpaca_text_and_columns(tmp_path):
    openai = write_lines(tmp_path / "a.jsonl", [CHAT, CHAT])
    sharegpt = write_lines(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}])
    alpaca = tmp_path / "c.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 2", "output": "4"}]))
    text = tmp_path / "d.txt"
    text.write_text("First paragraph.\n\nSecond paragraph.\n")
    table = tmp_path / "e.csv"
    table.write_text('question,answer\n"What?","That."\n')

    assert load_dataset_file(openai).format == "openai"
    loaded = load_dataset_file(sharegpt)
    assert loaded.format == "sharegpt" and loaded.conversations[0][1] == {"role": "assistant", "content": "Yo"}
    loaded = load_dataset_file(alpaca)
    assert loaded.format == "alpaca" and loaded.conversations[0][0]["content"] == "Add\n\n2 and 2"
    loaded = load_dataset_file(text)
    assert loaded.format == "text" and loaded.texts == ["First paragraph.", "Second paragraph."]
    loaded = load_dataset_file(table)
    assert loaded.format == "prompt_response" and loaded.conversations[0][1]["content"] == "That."


def test_parquet_with_column_mapping_and_save_to_disk(tmp_path):
    import datasets

    rows = {"q": ["Hello?", "Bye?"], "a": ["Hi there.", "Farewell."]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "t.parquet"))
    loaded = load_dataset_file(tmp_path / "t.parquet", prompt_column="q", response_column="a")
    assert [m[1]["content"] for m in loaded.conversations] == ["Hi there.", "Farewell."]
    with pytest.raises(DatasetError, match=r"cannot tell the dataset layout from its columns \(a, q\)"):
        load_dataset_file(tmp_path / "t.parquet")

    datasets.Dataset.from_dict({"messages": [CHAT["messages"]]}).save_to_disk(str(tmp_path / "saved"))
    assert load_dataset_file(tmp_path / "saved").format == "openai"


def test_bad_json_line_is_named(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [CHAT, CHAT, '{"messages": [oops', CHAT])
    with pytest.raises(DatasetError) as info:
        load_dataset_file(path)
    assert "bad.jsonl line 3: not valid JSON" in str(info.value)


def test_missing_role_and_content_are_listed_with_line_numbers(tmp_path):
    path = write_lines(tmp_path / "roles.jsonl", [
        CHAT,
        {"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ])
    with pytest.raises(DatasetError) as info:
        load_dataset_file(path)
    text = str(info.value)
    assert "3 of 4 rows have problems" in text
    assert "roles.jsonl line 2: message 1 has role None" in text
    assert "roles.jsonl line 3: message 2 (assistant) has no text 'content'" in text
    assert "roles.jsonl line 4: no assistant reply" in text


def test_problem_list_is_capped(tmp_path):
    path = write_lines(tmp_path / "many.jsonl", [{"messages": [{"role": "user", "content": "q"}]}] * 25)
    with pytest.raises(DatasetError) as info:
        load_dataset_file(path)
    assert len(info.value.problems) == 10 and "showing the first 10" in str(info.value)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x00\x01\x02binary\x00", "binary file"),
])
def test_empty_and_binary_files(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset_file(path)


def test_unknown_columns_and_missing_file(tmp_path):
    path = write_lines(tmp_path / "cols.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DatasetError, match=r"cannot tell the dataset layout.*bar, foo"):
        load_dataset_file(path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset_file(tmp_path / "nope.jsonl")


def test_only_assistant_tokens_are_trained(tokenizer):
    messages = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Ahoy matey"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Fair winds"}]
    example, length = tokenize_conversation(tokenizer, messages, max_len=512)
    assert length == len(example.input_ids)
    trained = tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX])
    assert "Ahoy matey" in trained and "Fair winds" in trained
    assert "Hello there" not in trained and "Be a pirate" not in trained and "Bye" not in trained
    assert trained.count("<|im_end|>") == 2  # the model must learn to end its turn
    segments = example_segments(tokenizer, messages[1:], "Be a pirate.", 512)
    assert [text for text, trained in segments if trained] == ["Ahoy matey<|im_end|>\n", "Fair winds<|im_end|>\n"]


def test_report_counts_truncation_and_system_prompt(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "word " * n}]} for n in (5, 50, 400)]
    loaded = load_dataset_file(write_lines(tmp_path / "len.jsonl", rows))
    examples, lengths = tokenize_dataset(tokenizer, loaded, max_len=128, system_prompt="You are terse.")
    report = build_report(loaded, lengths, len(examples), 128)
    assert report.rows == 3 and report.truncated_rows == 1 and report.usable_rows == 3
    assert max(len(e.input_ids) for e in examples) == 128
    assert all("You are terse." in tokenizer.decode(e.input_ids) for e in examples)
    assert "Truncated at max length 128: 1 row(s)" in report.to_text()


def test_measuring_a_dataset_counts_the_rows_tokenizing_keeps_without_keeping_them(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Aye."}]}
            for prompt in ("Hello", "word " * 200, "Bye")]  # the long prompt leaves its reply past max_len: untrained
    loaded = load_dataset_file(write_lines(tmp_path / "rows.jsonl", rows))
    examples, lengths = tokenize_dataset(tokenizer, loaded, max_len=64, system_prompt=None)
    assert len(examples) == 2
    assert measure_dataset(tokenizer, loaded, max_len=64, system_prompt=None) == (2, lengths)
