"""Fuzzed dataset files in all six layouts: every outcome is a loaded dataset or a DatasetError naming the file.

Hypothesis builds rows for each layout (OpenAI chat, ShareGPT, Alpaca, prompt/response, plain text, and any of them
saved with `datasets`' save_to_disk) where any field may be missing or of the wrong type, writes them as JSONL, JSON,
CSV, TXT or Parquet, and then mutates the bytes: truncation, flipped bits, invalid UTF-8, byte-order marks, CRLF line
ends, NUL bytes, very long lines and JSON nested thousands of levels deep. The property is the CLI contract: success
or a clear, named error (exit 2), never an unexpected exception (exit 1) and never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given, note
from hypothesis import strategies as st

from app.cli import main
from app.core.config import DATA_FORMATS
from app.core.data import ROLES, build_report, load_dataset_file, tokenize_dataset
from app.core.errors import TailorError

REPO = Path(__file__).resolve().parents[2]
MISSING = object()

# Any JSON value: what a field holds when it holds the wrong thing.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
texts = st.text(max_size=40) | st.sampled_from(["", " ", "\ufeffhello", "line\r\nbreak", "caf\u00e9", "\U0001f600"])


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a valid value, sometimes a value of any JSON type, sometimes no field at all."""
    return st.one_of(valid, valid, valid, json_values, st.just(MISSING))


def row(fuzzed: bool, **fields: st.SearchStrategy) -> st.SearchStrategy:
    wrap = field if fuzzed else (lambda valid: valid)
    return st.fixed_dictionaries({key: wrap(value) for key, value in fields.items()}).map(
        lambda values: {key: value for key, value in values.items() if value is not MISSING})


def layouts(fuzzed: bool) -> dict[str, st.SearchStrategy]:
    """Row strategies per layout: valid rows, or (fuzzed) rows whose every field may be missing or of any type."""
    text = texts if fuzzed else sentences
    message = row(fuzzed, role=st.sampled_from([*ROLES, "tool", "User"] if fuzzed else ["user"]), content=text)
    reply = row(fuzzed, role=st.just("assistant"), content=text)
    turn = row(fuzzed, **{"from": st.sampled_from(["human", "gpt", "system", "robot"] if fuzzed else ["human"]),
                          "value": text})
    answer = row(fuzzed, **{"from": st.just("gpt"), "value": text})
    return {
        "openai": row(fuzzed, messages=st.tuples(st.lists(message, max_size=3), reply).map(lambda t: [*t[0], t[1]])),
        "sharegpt": row(fuzzed, conversations=st.tuples(st.lists(turn, max_size=3), answer).map(lambda t: [*t[0], t[1]])),
        "alpaca": row(fuzzed, instruction=text, input=text, output=text),
        "prompt_response": row(fuzzed, prompt=text, response=text),
        "text": row(fuzzed, text=text),
    }


sentences = st.text(min_size=1, max_size=40).filter(str.strip) | st.sampled_from(["Hi", "caf\u00e9 \U0001f600", "a\r\nb"])
ROWS, VALID_ROWS = layouts(fuzzed=True), layouts(fuzzed=False)
# The file types each layout comes in; save_to_disk folders (the sixth format, hf_disk) hold any layout.
CONTAINERS = {
    "openai": ["jsonl", "json", "parquet", "hf_disk"],
    "sharegpt": ["jsonl", "json", "parquet", "hf_disk"],
    "alpaca": ["jsonl", "json", "csv", "parquet", "hf_disk"],
    "prompt_response": ["jsonl", "json", "csv", "parquet", "hf_disk"],
    "text": ["jsonl", "txt", "csv", "parquet", "hf_disk"],
}

DEEP = b"[" * 5000 + b"]" * 5000
INSERTS = [b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\r\n", b"\x00", b"\n\n\n", b'"', b"{", b"]",
           b'{"messages": ' + DEEP + b"}\n", DEEP, b'{"text": "' + b"x" * 300_000 + b'"}\n', b"a" * 300_000]


@st.composite
def mutations(draw):
    """A list of byte-level edits: (kind, position as a fraction of the length, payload)."""
    edits = st.tuples(st.sampled_from(["truncate", "flip", "insert", "bom", "crlf"]), st.floats(0, 1),
                      st.sampled_from(INSERTS) | st.binary(min_size=1, max_size=8))
    return draw(st.lists(edits, max_size=3))


def mutate(data: bytes, edits) -> bytes:
    for kind, where, payload in edits:
        position = int(where * len(data))
        if kind == "truncate":
            data = data[:position]
        elif kind == "flip" and data:
            position = min(position, len(data) - 1)
            data = data[:position] + bytes([data[position] ^ (1 << (len(payload) % 8))]) + data[position + 1:]
        elif kind == "insert":
            data = data[:position] + payload + data[position:]
        elif kind == "bom":
            data = b"\xef\xbb\xbf" + data
        elif kind == "crlf":
            data = data.replace(b"\n", b"\r\n")
    return data


def _flat(value):
    """CSV and text cells are strings; other values go in as their JSON text, as a spreadsheet export would."""
    return value if isinstance(value, str) else json.dumps(value)


def write_dataset(folder: Path, layout: str, container: str, rows: list[dict], edits) -> Path:
    if container in ("parquet", "hf_disk"):
        import datasets
        import pyarrow as pa

        try:
            table = datasets.Dataset(pa.Table.from_pylist(rows))
            if container == "parquet":
                path = folder / "data.parquet"
                table.to_parquet(str(path))
                path.write_bytes(mutate(path.read_bytes(), edits))
                return path
            path = folder / "saved"
            table.save_to_disk(str(path))
            for file in sorted(path.iterdir())[: len(edits)]:  # damage the arrow data and the JSON metadata alike
                file.write_bytes(mutate(file.read_bytes(), edits))
            return path
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            # Columns of mixed types have no Arrow schema (the user could not have saved them either): use JSONL.
            for leftover in folder.iterdir():
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            container = "jsonl"
    path = folder / f"data.{container}"
    if container == "jsonl":
        data = "".join(json.dumps(value, ensure_ascii=False) + "\n" for value in rows)
    elif container == "json":
        data = json.dumps(rows, ensure_ascii=False)
    elif container == "txt":
        data = "\n\n".join(_flat(value.get("text", "")) for value in rows)
    else:
        import csv

        columns = sorted({key for value in rows for key in value}) or ["text"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows({key: _flat(value.get(key, "")) for key in columns} for value in rows)
        data = buffer.getvalue()
    path.write_bytes(mutate(data.encode("utf-8", errors="surrogatepass"), edits))
    return path


@st.composite
def dataset_cases(draw):
    layout = draw(st.sampled_from(sorted(ROWS)))
    # Half the files start valid, so both outcomes (loaded, refused) are explored, not only the refusals.
    rows = st.lists(VALID_ROWS[layout], min_size=1, max_size=6) | st.lists(ROWS[layout], max_size=6)
    return (layout, draw(st.sampled_from(CONTAINERS[layout])), draw(rows), draw(st.just([]) | mutations()),
            draw(st.sampled_from(["auto", "auto", layout, *DATA_FORMATS])))


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from app.core.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_base)
    return lambda: tokenizer  # a function, so Hypothesis' failure report does not print the whole vocabulary


@pytest.fixture(scope="module", autouse=True)
def scratch_cache(tiny_base, tmp_path_factory):
    """`datasets` caches every file it parses; keep the thousands of fuzzed ones out of the shared test cache."""
    previous = os.environ.get("TAILOR_CACHE")
    os.environ["TAILOR_CACHE"] = str(tmp_path_factory.mktemp("datasets-cache"))
    yield
    if previous is None:
        os.environ.pop("TAILOR_CACHE")
    else:
        os.environ["TAILOR_CACHE"] = previous


def _assert_named_error(error: TailorError, path: Path) -> None:
    text = str(error)
    assert path.name in text or str(path) in text, f"the message does not name the file: {text!r}"
    assert "Traceback" not in text


@given(case=dataset_cases())
def test_fuzzed_dataset_loads_or_fails_with_a_named_error(case, tokenizer):
    layout, container, rows, edits, format = case
    with tempfile.TemporaryDirectory() as folder:
        path = write_dataset(Path(folder), layout, container, rows, edits)
        note(f"{path.name}: {path.read_bytes()[:400]!r}" if path.is_file() else str(path))
        before = sorted(os.listdir(folder))
        try:
            loaded = load_dataset_file(path, format)
        except TailorError as error:
            event("refused")
            _assert_named_error(error, path)
        else:
            event("loaded")
            # What loads must be usable all the way through what `tailor data check` does next.
            assert loaded.rows > 0
            for conversation in loaded.conversations:
                assert all(m["role"] in ROLES and isinstance(m["content"], str) for m in conversation)
            examples, lengths = tokenize_dataset(tokenizer(), loaded, 64, "You are terse.")
            build_report(loaded, lengths, len(examples), 64).to_text()
        assert sorted(os.listdir(folder)) == before, "loading a dataset wrote beside it"


def _run_cli(argv: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, stderr.getvalue()


@given(case=dataset_cases())
def test_cli_data_check_exits_0_or_2_without_a_traceback(case, tiny_base):
    layout, container, rows, edits, format = case
    with tempfile.TemporaryDirectory() as folder:
        path = write_dataset(Path(folder), layout, container, rows, edits)
        code, stderr = _run_cli(["data", "check", str(path), "--base", str(tiny_base), "--max-len", "64",
                                 "--format", format])
    assert code in (0, 2), stderr
    assert "Traceback" not in stderr and "unexpected error" not in stderr, stderr


@pytest.mark.parametrize("content, message", [
    (b'{"messages": ' + DEEP + b"}\n", "line 1: nested"),
    (b'{"text": "ok"}\n\xff\xfe\n', "not UTF-8"),
    (b'{"messages": [{"role": "user", "content": 5}]}\r\n', "line 1: message 1 (user) has no text"),
], ids=["deep-nesting", "invalid-utf8", "wrong-type-crlf"])
def test_real_cli_process_exits_2_with_the_file_and_line(content, message, tmp_path):
    """A real `tailor` process, so the exit code is the one a shell sees."""
    path = tmp_path / "broken.jsonl"
    path.write_bytes(content)
    environment = {**os.environ, "TAILOR_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "app.cli", "data", "check", str(path)], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "broken.jsonl" in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
