"""Load a dataset in whatever common layout it comes in, validate it, and turn it into masked training examples.

Loading goes through the `datasets` library. When it cannot parse a file, a line-by-line scan finds *where* it
broke, so the user gets "line 17: not valid JSON" rather than an Arrow stack trace. Every layout is normalised into
conversations (lists of role/content messages); those are rendered with the base model's own chat template and only
the assistant's tokens carry a loss.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from app.core.errors import DatasetError
from app.core.templates import model_label, place_system_prompt, render

MAX_PROBLEMS = 10
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant"}
# Column pairs recognised in tables, in order of preference.
_PROMPT_RESPONSE_PAIRS = (("prompt", "response"), ("prompt", "completion"), ("question", "answer"), ("input", "output"),
                          ("instruction", "response"), ("user", "assistant"), ("query", "response"))
# Python's json parser recurses once per level; the layouts Tailor reads nest four levels at most.
_TOO_DEEP = "nested too deeply to be a dataset row (thousands of levels of [ or {)"
_SUFFIX_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    """One tokenised training example: labels are IGNORE_INDEX wherever no loss is wanted."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class LoadedDataset:
    """A dataset normalised to conversations, or to raw texts for plain-text continued training."""

    path: Path
    format: str
    columns: list[str]
    preview: list[dict[str, Any]]
    """The first rows as they are in the file, for the wizard's table."""
    conversations: list[Messages] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.texts) if self.format == "text" else len(self.conversations)


@dataclass(frozen=True)
class DatasetReport:
    path: str
    format: str
    rows: int
    usable_rows: int
    """Rows that keep at least one trained token after truncation."""
    columns: list[str]
    token_lengths: list[int]
    max_len: int
    truncated_rows: int
    fingerprint: str
    sample: Messages | str
    preview: list[dict[str, Any]]

    def stats(self) -> dict[str, float]:
        lengths = self.token_lengths or [0]
        ordered = sorted(lengths)
        return {"min": ordered[0], "mean": statistics.fmean(ordered), "median": statistics.median(ordered),
                "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}

    def to_text(self) -> str:
        stats = self.stats()
        lines = [
            f"Dataset: {self.path}",
            f"Format: {self.format}",
            f"Rows: {self.rows} ({self.usable_rows} usable)",
            f"Tokens per row: min {stats['min']}, mean {stats['mean']:.0f}, median {stats['median']:.0f}, "
            f"95th percentile {stats['p95']}, max {stats['max']}",
            f"Truncated at max length {self.max_len}: {self.truncated_rows} row(s)",
            "Sample:",
        ]
        if isinstance(self.sample, str):
            lines.append(f"  {self.sample[:300]}")
        else:
            lines += [f"  [{m['role']}] {m['content'][:200]}" for m in self.sample]
        return "\n".join(lines)


def fingerprint_path(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise DatasetError(f"The dataset {path} does not exist.", hint="Check the path.")
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise DatasetError(f"The folder {path} is not a dataset saved with datasets' save_to_disk.",
                               hint="Pick a .jsonl, .json, .csv, .parquet or .txt file, or a save_to_disk folder.")
        return
    if path.stat().st_size == 0:
        raise DatasetError(f"The dataset {path} is empty.", hint="Add at least one example.")
    if path.suffix.lower() not in _SUFFIX_BUILDERS:
        raise DatasetError(f"{path.name}: Tailor does not know files ending in '{path.suffix}'.",
                           hint="Use .jsonl, .json, .csv, .parquet or .txt, or a save_to_disk folder.")
    if path.suffix.lower() != ".parquet":
        with open(path, "rb") as handle:
            head = handle.read(8192)
        if b"\x00" in head:
            raise DatasetError(f"{path.name} looks like a binary file, not text.",
                               hint="Datasets must be UTF-8 text (JSONL, CSV, TXT) or Parquet.")
        where = _first_invalid_utf8(path)
        if where:
            raise DatasetError(f"{path.name} {where}: not UTF-8 text.", hint="Save the file as UTF-8.")


def _first_invalid_utf8(path: Path) -> str | None:
    """Where the file stops being UTF-8 ('line 3, byte 17'), read in chunks so a large file costs little memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, newline = 1, b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                before = exc.object[: exc.start]
                column = exc.start - before.rfind(newline)
                return f"line {line + before.count(newline)}, byte {column}"
            line += chunk.count(newline)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"line {line}, at its end (a character cut short)"
    return None


def _json_line_problems(path: Path) -> list[str]:
    """Find the lines a JSONL loader choked on, so the message can point at them."""
    problems = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path.name} line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
            except RecursionError:
                problems.append(f"{path.name} line {number}: {_TOO_DEEP}")
            else:
                if not isinstance(value, dict):
                    problems.append(f"{path.name} line {number}: expected a JSON object, found {type(value).__name__}")
            if len(problems) >= MAX_PROBLEMS:
                break
    return problems


def _load_table(path: Path):
    """Load the file (or save_to_disk folder) as a `datasets.Dataset`."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors are reported by line below
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # a damaged folder fails deep inside datasets/pyarrow, in many exception types
            raise DatasetError(f"The saved dataset {path} is damaged or incomplete: {_root_cause(exc)}",
                               hint="Save it again with save_to_disk, or export it as JSONL.") from exc
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return loaded
    builder = _SUFFIX_BUILDERS[path.suffix.lower()]
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    from app.core.paths import cache_home

    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train",
                                     cache_dir=str(cache_home() / "datasets"), **options)
    except Exception as exc:  # datasets wraps parse failures in several exception types; diagnose them ourselves
        problems = _json_line_problems(path) if builder == "json" else []
        if builder == "json" and not problems and path.suffix.lower() == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8-sig", errors="replace"))
            except json.JSONDecodeError as parse_error:
                problems = [f"{path.name} line {parse_error.lineno}: not valid JSON ({parse_error.msg})"]
            except RecursionError:
                problems = [f"{path.name}: {_TOO_DEEP}"]
        raise DatasetError(f"Could not read {path.name}.", problems or [f"{path.name}: {_root_cause(exc)}"],
                           hint="Fix the lines listed above and try again.") from exc


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def detect_format(columns: Iterable[str], path: Path) -> str:
    names = set(columns)
    if "messages" in names:
        return "openai"
    if "conversations" in names:
        return "sharegpt"
    if {"instruction", "output"} <= names:
        return "alpaca"
    if any({prompt, response} <= names for prompt, response in _PROMPT_RESPONSE_PAIRS):
        return "prompt_response"
    if "text" in names or path.suffix.lower() == ".txt":
        return "text"
    raise DatasetError(
        f"{path.name}: cannot tell the dataset layout from its columns ({', '.join(sorted(names)) or 'none'}).",
        hint="Use OpenAI chat ('messages'), ShareGPT ('conversations'), Alpaca ('instruction'/'output'), "
             "a 'text' column, or prompt/response columns (choose them with the column mapping).",
    )


def _row_label(path: Path, index: int) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return f"{path.name} line {index + 1}"
    if suffix == ".csv":
        return f"{path.name} row {index + 2}"  # row 1 is the header
    return f"{path.name} row {index + 1}"


def _openai_messages(row: dict, where: str) -> Messages:
    raw = row.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    messages = []
    for position, message in enumerate(raw, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {position} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: message {position} has role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {position} ({role}) has no text 'content'")
        messages.append({"role": role, "content": content})
    return messages


def _sharegpt_messages(row: dict, where: str) -> Messages:
    raw = row.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list")
    messages = []
    for position, turn in enumerate(raw, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: turn {position} is not an object")
        speaker, value = turn.get("from"), turn.get("value")
        role = _SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise ValueError(f"{where}: turn {position} is from {speaker!r}; use human, gpt or system")
        if not isinstance(value, str):
            raise ValueError(f"{where}: turn {position} ({speaker}) has no text 'value'")
        messages.append({"role": role, "content": value})
    return messages


def _alpaca_messages(row: dict, where: str) -> Messages:
    instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where}: 'instruction' is empty")
    if not isinstance(output, str) or not output.strip():
        raise ValueError(f"{where}: 'output' is empty")
    prompt = f"{instruction}\n\n{extra}" if str(extra).strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _pick_prompt_response(columns: list[str], prompt_column: str | None, response_column: str | None, path: Path) -> tuple[str, str]:
    if prompt_column or response_column:
        missing = [c for c in (prompt_column, response_column) if not c or c not in columns]
        if missing:
            raise DatasetError(f"{path.name}: column(s) {missing} not found; the file has {', '.join(columns)}.",
                               hint="Choose the prompt and response columns from the list.")
        return prompt_column, response_column  # type: ignore[return-value]
    for prompt, response in _PROMPT_RESPONSE_PAIRS:
        if prompt in columns and response in columns:
            return prompt, response
    raise DatasetError(f"{path.name}: no prompt/response columns found among {', '.join(columns)}.",
                       hint="Choose which column is the prompt and which the response.")


def load_dataset_file(path: str | Path, format: str = "auto", prompt_column: str | None = None,
                      response_column: str | None = None, preview_rows: int = 20) -> LoadedDataset:
    """Load and validate a dataset; raises DatasetError naming each bad line or row (the first MAX_PROBLEMS)."""
    path = Path(path).expanduser()
    _check_readable(path)
    table = _load_table(path)
    columns = list(table.column_names)
    if len(table) == 0:
        raise DatasetError(f"{path.name} has no rows.", hint="Add at least one example.")
    if format in ("auto", "hf_disk"):
        # A column mapping is the user telling us the layout.
        detected = "prompt_response" if prompt_column or response_column else detect_format(columns, path)
    else:
        detected = format
    rows = table.to_list()
    loaded = LoadedDataset(path=path, format=detected, columns=columns,
                           preview=[{k: _preview_value(v) for k, v in row.items()} for row in rows[:preview_rows]])
    problems: list[str] = []

    if detected == "text":
        if "text" not in columns:
            raise DatasetError(f"{path.name}: plain-text format needs a 'text' column; found {', '.join(columns)}.")
        loaded.texts = [row["text"].strip() for row in rows if isinstance(row.get("text"), str) and row["text"].strip()]
        if not loaded.texts:
            raise DatasetError(f"{path.name} contains no text.")
        return loaded

    if detected == "prompt_response":
        prompt, response = _pick_prompt_response(columns, prompt_column, response_column, path)

        def convert(row: dict, where: str) -> Messages:
            if not isinstance(row.get(prompt), str) or not row[prompt].strip():
                raise ValueError(f"{where}: '{prompt}' is empty")
            if not isinstance(row.get(response), str) or not row[response].strip():
                raise ValueError(f"{where}: '{response}' is empty")
            return [{"role": "user", "content": row[prompt]}, {"role": "assistant", "content": row[response]}]
    else:
        required = {"openai": "messages", "sharegpt": "conversations", "alpaca": "instruction"}[detected]
        if required not in columns:
            raise DatasetError(f"{path.name}: the {detected} format needs a '{required}' field; found {', '.join(columns)}.",
                               hint="Pick another format, or leave it on automatic detection.")
        convert = {"openai": _openai_messages, "sharegpt": _sharegpt_messages, "alpaca": _alpaca_messages}[detected]

    total_problems = 0
    for index, row in enumerate(rows):
        where = _row_label(path, index)
        try:
            messages = convert(row, where)
            if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
                raise ValueError(f"{where}: no assistant reply to learn from")
            if messages[0]["role"] == "assistant":  # a reply needs something it replies to; templates refuse it too
                raise ValueError(f"{where}: starts with an assistant reply; put the user's message before it")
        except ValueError as exc:
            total_problems += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(str(exc))
            continue
        loaded.conversations.append(messages)
    if problems:
        more = f" (showing the first {MAX_PROBLEMS})" if total_problems > MAX_PROBLEMS else ""
        raise DatasetError(f"{path.name}: {total_problems} of {len(rows)} rows have problems{more}.", problems,
                           hint="Fix or remove those rows and try again.")
    return loaded


def _preview_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 300 else text[:297] + "…"


def with_system_prompt(messages: Messages, system_prompt: str | None) -> Messages:
    """The persona's system prompt goes first unless the example brings its own."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _assistant_spans(tokenizer, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and find the character spans the assistant wrote (its end-of-turn marker included).

    Rendering the prefix before each assistant turn with the generation prompt, and the conversation up to the end
    of that turn, gives the exact text the template adds for the reply whatever the template's markup looks like.
    Some templates close every rendering with the end-of-sequence token (Phi-3.5); inside a longer conversation that
    token is not there, so a reply's span stops where the two renderings part, before any such closing token.
    """
    full = render(tokenizer, messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], tokenize=False, add_generation_prompt=True)
        through = render(tokenizer, messages[: index + 1], tokenize=False)
        end = _turn_end(through, full, tokenizer.eos_token)
        if not through.startswith(before) or not full.startswith(before) or end <= len(before):
            raise DatasetError(f"The chat template of {model_label(tokenizer)} renders a conversation differently "
                               "from its beginning, so the reply's tokens cannot be located.",
                               hint="Pick another base model, or report the template to the model's authors.")
        spans.append((len(before), end))
    return full, spans


def _turn_end(through: str, full: str, eos_token: str | None) -> int:
    """Where the reply that `through` ends with stops inside `full`."""
    end = len(os.path.commonprefix([through, full]))
    closing = len(through) - len(eos_token or "")
    if end < len(through) and eos_token and through.endswith(eos_token) and closing < end:
        end = closing  # the two renderings share the first characters of the closing token and the next turn
    return end


def tokenize_conversation(tokenizer, messages: Messages, max_len: int) -> tuple[Example, int]:
    """Returns the example (cut to max_len) and its untruncated length in tokens.

    A leading system message goes where the template wants it (templates.place_system_prompt), as in chat."""
    text, spans = _assistant_spans(tokenizer, place_system_prompt(tokenizer, messages))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        # A token that runs on past the reply's end (BPE merging the end-of-turn marker with the next turn's first
        # characters, when the markers are not special tokens) would teach the persona to start the next turn.
        if span_index < len(spans) and spans[span_index][0] <= start and end <= spans[span_index][1]:
            labels[position] = ids[position]
    return Example(ids[:max_len], labels[:max_len]), len(ids)


def tokenize_text(tokenizer, text: str, max_len: int) -> tuple[Example, int]:
    ids = tokenizer(text + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    return Example(ids[:max_len], ids[:max_len]), len(ids)


def tokenized_rows(tokenizer, loaded: LoadedDataset, max_len: int, system_prompt: str | None) -> Iterator[tuple[Example, int]]:
    """Each row as an example cut to `max_len`, with its untruncated length, one row at a time."""
    if loaded.format == "text":
        return (tokenize_text(tokenizer, text, max_len) for text in loaded.texts)
    return (tokenize_conversation(tokenizer, with_system_prompt(m, system_prompt), max_len) for m in loaded.conversations)


def tokenize_dataset(tokenizer, loaded: LoadedDataset, max_len: int, system_prompt: str | None) -> tuple[list[Example], list[int]]:
    """All examples with at least one trained token, and the untruncated length of every row."""
    examples, lengths = [], []
    for example, length in tokenized_rows(tokenizer, loaded, max_len, system_prompt):
        lengths.append(length)
        if example.trained_tokens:
            examples.append(example)
    return examples, lengths


def measure_dataset(tokenizer, loaded: LoadedDataset, max_len: int, system_prompt: str | None) -> tuple[int, list[int]]:
    """How many rows have a trained token, and every row's untruncated length: what a report needs, without keeping
    the examples. Each is freed as soon as it is counted; freeing 50,000 at once holds the GIL for 0.3 s, which
    froze the app's window while a worker checked a big dataset (bench/dataset_editor_stall.py)."""
    usable, lengths = 0, []
    for example, length in tokenized_rows(tokenizer, loaded, max_len, system_prompt):
        lengths.append(length)
        usable += bool(example.trained_tokens)
    return usable, lengths


def build_report(loaded: LoadedDataset, lengths: list[int], usable_rows: int, max_len: int) -> DatasetReport:
    return DatasetReport(
        path=str(loaded.path), format=loaded.format, rows=loaded.rows, usable_rows=usable_rows,
        columns=loaded.columns, token_lengths=lengths, max_len=max_len,
        truncated_rows=sum(length > max_len for length in lengths), fingerprint=fingerprint_path(loaded.path),
        sample=loaded.texts[0] if loaded.format == "text" else loaded.conversations[0], preview=loaded.preview,
    )


def example_segments(tokenizer, messages: Messages, system_prompt: str | None, max_len: int) -> list[tuple[str, bool]]:
    """One example as consecutive (text, trained) pieces: what the GUI highlights as learned vs. masked."""
    example, _ = tokenize_conversation(tokenizer, with_system_prompt(messages, system_prompt), max_len)
    segments: list[tuple[str, bool]] = []
    run: list[int] = []
    run_trained = None
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            segments.append((tokenizer.decode(run), bool(run_trained)))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        segments.append((tokenizer.decode(run), bool(run_trained)))
    return segments
