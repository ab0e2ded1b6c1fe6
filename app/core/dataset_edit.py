"""What the dataset editor needs beyond loading: token lengths, duplicates, filters, a report, and safe saving.

Everything here works on plain conversations (lists of role/content messages, as `app.core.data` loads them) and
knows nothing of Qt, so the GUI runs it on a worker thread and the CLI and tests call it directly.

Near-duplicates are found with MinHash over character 5-grams and locality-sensitive hashing (banding), then checked
by how many of the 32 MinHash values agree (an estimate of the Jaccard similarity of the two shingle sets): "ok thanks!" and "Ok, thanks" are the same example for a
persona, and pairs of 50,000 rows are never compared one by one.
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from app.core.data import Messages, with_system_prompt
from app.core.errors import DatasetError
from app.core.library import write_text_atomic

SAMPLES = Path(__file__).resolve().parents[2] / "resources" / "datasets"
NEAR_DUPLICATE_SIMILARITY = 0.8
SHINGLE = 5
_PERMUTATIONS = 32
_BANDS = 8  # 8 bands of 4 rows: pairs at Jaccard 0.8 become candidates with probability 1 - (1 - 0.8**4)**8 ≈ 0.99
_MERSENNE = (1 << 61) - 1
_CHECKED = 32
"""Candidates checked per bucket: the most recent ones, so a bucket of many similar-but-distinct rows (short
greetings) cannot make the search quadratic."""
FILTERS = {"all": "All examples", "too_long": "Too long for the max length", "no_reply": "No assistant reply",
           "duplicates": "Duplicates"}


def has_reply(messages: Messages) -> bool:
    return any(message["role"] == "assistant" and message["content"].strip() for message in messages)


def token_lengths(tokenizer, conversations: Sequence[Messages], system_prompt: str | None, batch: int = 512) -> list[int]:
    """Each conversation's length in tokens as training renders it (the same count `data.tokenize_conversation`
    gives, without its masking work): rendered with the chat template, then encoded in batches."""
    lengths: list[int] = []
    for start in range(0, len(conversations), batch):
        texts = [tokenizer.apply_chat_template(with_system_prompt(messages, system_prompt), tokenize=False)
                 for messages in conversations[start:start + batch]]
        lengths += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return lengths


def normalised_text(messages: Messages) -> str:
    """The words of a conversation without case, accents, punctuation or spacing: what makes two rows the same."""
    joined = " | ".join(f"{message['role']}: {message['content']}" for message in messages)
    folded = unicodedata.normalize("NFKD", joined.casefold())
    return " ".join(re.sub(r"[^\w|:]+", " ", "".join(c for c in folded if not unicodedata.combining(c))).split())


def _shingles(text: str) -> set[int]:
    import zlib

    if len(text) <= SHINGLE:
        return {zlib.crc32(text.encode())}
    return {zlib.crc32(text[i:i + SHINGLE].encode()) for i in range(len(text) - SHINGLE + 1)}


def find_duplicates(conversations: Sequence[Messages], near: bool = True,
                    similarity: float = NEAR_DUPLICATE_SIMILARITY) -> list[int | None]:
    """For each row, the index of an earlier row it duplicates (exactly, or near when `near`), else None."""
    import numpy as np

    texts = [normalised_text(messages) for messages in conversations]
    duplicate_of: list[int | None] = [None] * len(texts)
    first_with: dict[str, int] = {}
    for index, text in enumerate(texts):
        duplicate_of[index] = first_with.setdefault(text, index)
        if duplicate_of[index] == index:
            duplicate_of[index] = None
    if not near:
        return duplicate_of

    rng = np.random.default_rng(0)
    a = rng.integers(1, _MERSENNE, _PERMUTATIONS, dtype=np.uint64)
    b = rng.integers(0, _MERSENNE, _PERMUTATIONS, dtype=np.uint64)
    rows = _PERMUTATIONS // _BANDS
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(_BANDS)]
    signatures = np.zeros((len(texts), _PERMUTATIONS), dtype=np.uint64)
    for index, text in enumerate(texts):
        if duplicate_of[index] is not None:
            continue
        shingles = _shingles(text)
        values = np.fromiter(shingles, dtype=np.uint64, count=len(shingles))
        # (a·x + b) mod p per permutation; uint64 wraps, which keeps it a fixed pseudo-random permutation per row.
        signature = ((values[None, :] * a[:, None] + b[:, None]) % np.uint64(_MERSENNE)).min(axis=1)
        signatures[index] = signature
        keys = [signature[band * rows:(band + 1) * rows].tobytes() for band in range(_BANDS)]
        candidates = sorted({candidate for band, key in enumerate(keys) for candidate in buckets[band].get(key, ())[-_CHECKED:]})
        if candidates:
            # The share of equal MinHash values estimates the Jaccard similarity of the two shingle sets.
            agreement = (signatures[candidates] == signature).mean(axis=1)
            best = int(agreement.argmax())
            if agreement[best] >= similarity:
                duplicate_of[index] = candidates[best]
                continue
        for band, key in enumerate(keys):  # only originals go into the buckets: a duplicate is found through its original
            buckets[band].setdefault(key, []).append(index)
    return duplicate_of


@dataclass(frozen=True)
class EditorReport:
    """The validation report the Dataset page shows, recomputed as the user edits."""

    rows: int
    lengths: list[int]
    max_len: int
    no_reply: list[int] = field(default_factory=list)
    too_long: list[int] = field(default_factory=list)
    duplicate_of: list[int | None] = field(default_factory=list)

    @property
    def duplicates(self) -> list[int]:
        return [index for index, original in enumerate(self.duplicate_of) if original is not None]

    def rows_for(self, name: str) -> list[int] | None:
        """Row indices a filter keeps; None for 'all'."""
        return {"too_long": self.too_long, "no_reply": self.no_reply, "duplicates": self.duplicates}.get(name)

    @property
    def usable(self) -> int:
        """Rows left once those without a reply and the duplicates are dropped."""
        return self.rows - len(set(self.no_reply) | set(self.duplicates))

    def warnings(self) -> list[str]:
        found = []
        if self.no_reply:
            found.append(f"{len(self.no_reply):,} example(s) have no assistant reply to learn from: training skips them.")
        if self.too_long:
            found.append(f"{len(self.too_long):,} example(s) are longer than the max length ({self.max_len}) and will be cut.")
        if self.duplicates:
            found.append(f"{len(self.duplicates):,} example(s) repeat an earlier one (exactly or nearly): the persona "
                         f"would learn them twice. Show them with the Duplicates filter and delete them.")
        too_few = too_few_warning(self.usable)
        if too_few:
            found.append(too_few)
        return found

    def to_text(self) -> str:
        return "\n".join([f"{self.rows:,} examples, {self.usable:,} usable."] + self.warnings())


def analyse(conversations: Sequence[Messages], lengths: Sequence[int], max_len: int, near: bool = True) -> EditorReport:
    return EditorReport(rows=len(conversations), lengths=list(lengths), max_len=max_len,
                        no_reply=[i for i, messages in enumerate(conversations) if not has_reply(messages)],
                        too_long=[i for i, length in enumerate(lengths) if length > max_len],
                        duplicate_of=find_duplicates(conversations, near=near))


def sample_dataset_sizes(folder: Path = SAMPLES) -> dict[str, int]:
    """Rows in each sample persona dataset Tailor ships: the yardstick for 'enough examples'."""
    sizes = {}
    for path in sorted(folder.glob("*.jsonl")):
        sizes[path.name] = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    for path in sorted(folder.glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as handle:
            sizes[path.name] = sum(1 for _ in csv.DictReader(handle))
    return sizes


def too_few_warning(examples: int, folder: Path = SAMPLES) -> str | None:
    """A warning when fewer examples are left than the smallest sample persona learned from, citing the samples."""
    sizes = sample_dataset_sizes(folder)
    if not sizes or examples >= min(sizes.values()):
        return None
    cited = ", ".join(f"{name} {rows}" for name, rows in sorted(sizes.items(), key=lambda item: item[1]))
    return (f"Only {examples:,} example(s) left: the sample personas needed {min(sizes.values())} to "
            f"{max(sizes.values())} to learn a voice ({cited}). Add more, or expect a weak persona.")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write to a temporary file beside `path`, then rename over it: a crash leaves the old file or the new one."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DatasetError(f"{path} is a folder.", hint="Choose a file name ending in .jsonl.")
    if not path.parent.is_dir():
        raise DatasetError(f"The folder {path.parent} does not exist.", hint="Choose an existing folder.")
    write_text_atomic(path, text)
    return path


def chat_jsonl(conversations: Iterable[Messages]) -> str:
    return "".join(json.dumps({"messages": messages}, ensure_ascii=False) + "\n" for messages in conversations)


def save_chat_jsonl(path: str | Path, conversations: Iterable[Messages]) -> Path:
    """Save as OpenAI-chat JSONL (one {"messages": [...]} a line), atomically."""
    return atomic_write_text(path, chat_jsonl(conversations))


def append_example(path: str | Path, record: dict) -> Path:
    """Add one {"messages": [...]} line to a chat JSONL file (created if missing), without risking what is there.

    The whole file is rewritten through `atomic_write_text`, so a failure midway leaves it as it was. A file that is
    not chat JSONL is refused rather than appended to, since the result would be unreadable as either.
    """
    path = Path(path).expanduser()
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    for number, line in enumerate(existing.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path.name} line {number} is not JSON, so this is not a chat JSONL file ({exc.msg}).",
                               hint="Pick a .jsonl dataset Tailor saved, or a new file name.") from exc
        if not isinstance(value, dict) or "messages" not in value:
            raise DatasetError(f"{path.name} line {number} has no 'messages': it is not a chat JSONL file.",
                               hint="Pick a .jsonl dataset of chats, or a new file name.")
    if existing and not existing.endswith("\n"):
        existing += "\n"
    return atomic_write_text(path, existing + json.dumps(record, ensure_ascii=False) + "\n")
