"""The held-out set: examples a run never trains on, so its loss says whether the persona generalises or overfits.

The split is taken from the dataset's rows before tokenising (deterministic in the seed, so a resumed run holds out
the same rows) and written beside the adapter as chat JSONL, so the report card can ask the persona the very
questions it never saw, even after the dataset file moved.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from app.core.data import LoadedDataset, Messages

HELDOUT_NAME = "heldout.jsonl"
DEFAULT_FRACTION = 0.1
DEFAULT_MAX_EXAMPLES = 50
# Below this many rows every example is worth more for training than for measuring.
MIN_ROWS_FOR_DEFAULT_SPLIT = 20


def heldout_size(rows: int, fraction: float | None) -> int:
    """Rows to hold out: the default rule when `fraction` is None, else exactly that share (0 turns it off)."""
    if fraction is None:
        return 0 if rows < MIN_ROWS_FOR_DEFAULT_SPLIT else min(DEFAULT_MAX_EXAMPLES, round(DEFAULT_FRACTION * rows))
    if fraction <= 0:
        return 0
    return min(rows - 1, max(1, round(fraction * rows)))


def split_rows(loaded: LoadedDataset, fraction: float | None, seed: int) -> tuple[LoadedDataset, LoadedDataset | None]:
    """(training rows, held-out rows or None): the held-out rows are a seeded random sample of the file's rows."""
    size = heldout_size(loaded.rows, fraction)
    if size == 0:
        return loaded, None
    held = set(random.Random(seed).sample(range(loaded.rows), size))

    def subset(keep) -> LoadedDataset:
        if loaded.format == "text":
            return dataclasses.replace(loaded, texts=[t for i, t in enumerate(loaded.texts) if keep(i)])
        return dataclasses.replace(loaded, conversations=[c for i, c in enumerate(loaded.conversations) if keep(i)])

    return subset(lambda i: i not in held), subset(lambda i: i in held)


def prompts_of(loaded: LoadedDataset | None, limit: int) -> list[Messages]:
    """Up to `limit` conversations cut before their last assistant reply: what to ask the persona."""
    if loaded is None or loaded.format == "text":
        return []
    prompts = []
    for conversation in loaded.conversations:
        last_reply = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
        if last_reply:
            prompts.append(conversation[:last_reply])
        if len(prompts) == limit:
            break
    return prompts


def write_heldout(folder: Path, loaded: LoadedDataset | None) -> None:
    """Keep the held-out conversations beside the adapter (chat JSONL, the format `tailor data check` reads)."""
    if loaded is None or loaded.format == "text":
        return
    with open(folder / HELDOUT_NAME, "w", encoding="utf-8") as handle:
        for conversation in loaded.conversations:
            handle.write(json.dumps({"messages": conversation}, ensure_ascii=False) + "\n")


def read_heldout(folder: Path) -> list[Messages]:
    """The held-out conversations a trained adapter recorded; empty when it had none."""
    path = Path(folder) / HELDOUT_NAME
    if not path.is_file():
        return []
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
