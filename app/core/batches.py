"""Which examples each optimizer step trains on, and how one step's examples split into micro-batches.

The data order is fixed per optimizer step (the effective batch = micro-batch x accumulation), not per micro-batch.
So changing the micro-batch mid-run — out-of-memory recovery halves it — changes how a step is computed, never
which examples it trains on: every epoch still covers every example exactly once and the planned step count holds.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from app.core.data import IGNORE_INDEX, Example

# Length-grouping window: sort this many steps' worth of examples by length, so batches hold similar lengths
# while the order stays random at the scale of the whole dataset.
MEGABATCH_FACTOR = 32


def group_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Random batches of similar-length examples; deterministic in (seed, epoch) so a resumed run sees the same order."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * MEGABATCH_FACTOR
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class StepPlan:
    """The examples of every optimizer step of a run: step s trains on `examples_for(s)`."""

    def __init__(self, lengths: Sequence[int], examples_per_step: int, seed: int):
        self.lengths = list(lengths)
        self.examples_per_step = examples_per_step
        self.seed = seed
        self.steps_per_epoch = math.ceil(len(self.lengths) / examples_per_step)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch_of(self, step: int) -> int:
        """Epoch (0-based) that the 0-based optimizer step `step` belongs to."""
        return step // self.steps_per_epoch

    def examples_for(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, group_batches(self.lengths, self.examples_per_step, self.seed, epoch))
        return self._epoch[1][position]


def split_micro_batches(indices: Sequence[int], lengths: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """One step's examples as micro-batches of similar length (longest first, so a too-big batch fails early)."""
    ordered = sorted(indices, key=lambda i: lengths[i], reverse=True)
    return [ordered[i:i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]


def collate(examples: list[Example], pad_id: int, packing: bool):
    """Padded rows (length-grouped, so little padding) or one packed row whose position ids restart per example."""
    import torch

    if packing:
        ids = [t for e in examples for t in e.input_ids]
        labels = []
        for example in examples:
            # The first token of each example must not be predicted from the previous example's last token.
            labels += [IGNORE_INDEX] + example.labels[1:]
        positions = [p for e in examples for p in range(len(e.input_ids))]
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]), "attention_mask": None}
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": None}


def trained_tokens(batch: dict) -> int:
    """Tokens whose prediction is trained (labels shifted by one, masked positions excluded)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
