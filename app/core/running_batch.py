"""A batch of replies decoded together that rows join and leave between decode steps (iteration-level, or
"continuous", batching: Orca's idea, what vLLM and TGI do).

Each step computes one token for every row in one forward pass, so four replies cost about one pass per token
instead of four. A new request does not wait for the batch to finish: it is prefilled (its prompt run through the
model) between two steps and decodes with the others from the next step on. A row that has ended leaves at once,
so no step computes a token nobody wants.

The rows share one transformers DynamicCache, left-padded: every row's tokens end at the right edge, so each step
appends one column for all rows. A joining row is prefilled alone, exactly as the chat engine prefills a prompt;
then its cache and the batch's are padded on the left to the same width and stacked. A row that leaves is dropped
from the batch dimension, and padding columns no remaining row needs are cut from the left. Each row's position ids
count its own tokens only and the attention mask hides the padding, so every row attends to exactly what it would
alone: the padding can change only the rounding of the masked softmax (in fp32, ~1e-6 in the logits).

Rows may use different personas: app.core.row_lora runs each row through its own LoRA matrices (peft's
`adapter_names=` mixed batch for adapters it cannot stack); when every row uses the same one, peft's plain
single-adapter path runs. Each row samples with its own settings and its own random generator (seeded as
`tailor chat` seeds it), so its reply does not depend on what else is in the batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from app.core import row_lora
from app.core.chat import BASE, ChatSession, GenerationSettings, _logits_processors

PEFT_BASE_ROW = "__base__"
"""peft's name, in a mixed batch, for a row that uses no adapter."""
ROW_ATTENTION = "tailor_rows"
"""The attention implementation (transformers' AttentionInterface) that attends row by row; see `_row_attention`."""


def _inference_mode(method):
    """Run the method under torch.inference_mode (no autograd records; the cache is never trained through)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return method(*args, **kwargs)

    return run


class RowSampler:
    """Picks a row's next token as generate() does for one reply with these settings: the chat engine's repetition
    penalty over the row's own recent tokens, then, when sampling, temperature, top-k and top-p (generate()'s
    order) and a draw from the row's own generator."""

    def __init__(self, settings: GenerationSettings, device: str):
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        processors = _logits_processors(settings)
        self.generator = None
        if not settings.greedy:
            if settings.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k:
                processors.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(settings.top_p))
            # A seed gives the draws torch.manual_seed(seed) gives `tailor chat`; no seed, a fresh one.
            self.generator = torch.Generator(device)
            self.generator.manual_seed(settings.seed) if settings.seed is not None else self.generator.seed()
        self.processors = LogitsProcessorList(processors)

    def __call__(self, tokens, logits) -> int:
        """The next token after `tokens` (1 x n, the row's prompt and reply so far) given its `logits` (1 x vocab)."""
        import torch

        scores = self.processors(tokens, logits)
        if self.generator is None:
            return int(scores.argmax(dim=-1))
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator))


@dataclass(eq=False)
class Row:
    """One reply being decoded."""

    owner: Any
    """Whoever asked for it (the serving engine's Generation)."""
    tokens: list[int]
    """The prompt, then every token sampled so far; the cache holds all but the last."""
    persona: str
    """The adapter (library name) or BASE."""
    sampler: RowSampler


class RunningBatch:
    """Rows decoding together on one ChatSession's model; see the module docstring. Not thread-safe: one thread
    (the serving engine's worker) owns it."""

    def __init__(self, session: ChatSession):
        self.session = session
        self.rows: list[Row] = []
        self.cache = None
        self.mask = None
        """The attention mask (rows x cache width): 1 where a row has a token, 0 where it is padded."""
        self._stacked: tuple[list[str | None], row_lora.RowLora | None] | None = None
        """The last mixed composition's adapter keys, row by row, and their stacks."""
        self.joinable = _plain_cache(session.base_model.config)
        """Whether a row can join while others decode. Only full-attention caches can be padded and stacked; a
        model with sliding-window or recurrent layers (Gemma 2, ...) takes new rows only into an empty batch."""
        self.row_attention = _use_row_attention(session.base_model)
        """Whether each row attends through its own tokens only (see `_row_attention`) rather than a padding mask."""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def personas(self) -> set[str]:
        return {row.persona for row in self.rows}

    @_inference_mode
    def join(self, row: Row) -> None:
        """Prefill the row's prompt alone, sample its first token, and add it to the batch."""
        import torch
        from transformers import DynamicCache

        if self.rows and not self.joinable:
            raise ValueError("This model's cache cannot take a row while others decode; wait for an empty batch.")
        device = self.session.device
        length = len(row.tokens)
        cache = DynamicCache(config=self.session.base_model.config)
        mask = torch.ones(1, length, dtype=torch.long, device=device)
        logits = self._forward([row], input_ids=torch.tensor([row.tokens], device=device), attention_mask=mask,
                               position_ids=torch.arange(length, device=device)[None], cache=cache)
        row.tokens.append(row.sampler(torch.tensor([row.tokens], device=device), logits))
        if self.rows:
            width = self.mask.shape[1]
            ours, theirs = _padded(self.cache, length - width), _padded(cache, width - length)
            for layer, (keys, values), (new_keys, new_values) in zip(self.cache.layers, ours, theirs):
                layer.keys, layer.values = torch.cat([keys, new_keys]), torch.cat([values, new_values])
            mask = torch.cat([_pad(self.mask, length - width), _pad(mask, width - length)])
        else:
            self.cache = cache
        self.rows.append(row)
        self.mask = mask

    @_inference_mode
    def step(self) -> None:
        """One token for every row, appended to its `tokens`."""
        import torch

        device = self.session.device
        mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=device)], dim=1)
        extra = {"row_starts": self.mask.int().argmax(dim=1).tolist()} if self.row_attention else {}
        logits = self._forward(self.rows, input_ids=torch.tensor([[row.tokens[-1]] for row in self.rows], device=device),
                               attention_mask=mask, cache=self.cache, **extra,
                               position_ids=torch.tensor([[len(row.tokens) - 1] for row in self.rows], device=device))
        self.mask = mask
        for index, row in enumerate(self.rows):
            row.tokens.append(row.sampler(torch.tensor([row.tokens], device=device), logits[index:index + 1]))

    @_inference_mode
    def leave(self, leaving: list[Row]) -> None:
        """Drop these rows now, and the padding only they needed."""
        import torch

        keep = [index for index, row in enumerate(self.rows) if row not in leaving]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[index] for index in keep]
        if not self.rows:
            self.cache = self.mask = self._stacked = None
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.mask.device))
        self.mask = self.mask[keep]
        unused = int(self.mask.any(dim=0).int().argmax())  # leading columns that are padding in every row
        if unused and self.joinable:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
            self.mask = self.mask[:, unused:]

    def _forward(self, rows: list[Row], **inputs):
        """The last position's logits (float32, rows x vocab), each row through its own persona."""
        import torch

        session = self.session
        personas = {row.persona for row in rows}
        # The session's lock: a `tailor chat` reply on the same session (tests do that) must not switch persona
        # between this step's select() and its forward pass.
        with session._lock:
            if len(personas) == 1:
                session.select(rows[0].persona)  # peft's plain single-adapter path
                output = session.model(**inputs, use_cache=True, logits_to_keep=1)
            else:
                keys = [None if row.persona == BASE else session.adapter_key(row.persona) for row in rows]
                stacked = self._row_lora(keys)
                if stacked is not None:
                    session.select(BASE)  # the layers give the base output; the stacks add each row's update
                    with stacked.applied():
                        output = session.model(**inputs, use_cache=True, logits_to_keep=1)
                else:
                    output = session.model(**inputs, use_cache=True, logits_to_keep=1,
                                           adapter_names=[key or PEFT_BASE_ROW for key in keys])
        return output.logits[:, -1].to(copy=True, dtype=torch.float32)  # a copy, as in generate(): processors edit it

    def _row_lora(self, keys: list[str | None]) -> row_lora.RowLora | None:
        """The stacked adapters for rows using `keys` (None: they do not stack), built when the batch's
        composition changes."""
        if self._stacked is None or self._stacked[0] != keys:
            self._stacked = None  # frees the old stacks before the new ones are built
            session = self.session
            stackable = row_lora.supports(session.peft_model, session._lora_layers, set(keys))
            self._stacked = keys, row_lora.RowLora(session._lora_layers, keys) if stackable else None
        return self._stacked[1]


def _pad(tensor, columns: int):
    """An attention mask with `columns` columns of padding (zeros) on the left."""
    import torch.nn.functional as F

    return F.pad(tensor, (max(columns, 0), 0))


def _padded(cache, columns: int) -> list:
    """(keys, values) of every cache layer with `columns` of zero padding before the first token."""
    import torch.nn.functional as F

    if columns <= 0:
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(F.pad(layer.keys, (0, 0, columns, 0)), F.pad(layer.values, (0, 0, columns, 0))) for layer in cache.layers]


def _plain_cache(config) -> bool:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def _row_attention(module, query, key, value, attention_mask, row_starts: list[int] | None = None, **kwargs):
    """transformers' sdpa attention; given `row_starts` (each row's first column that is not padding, in a decode
    step), every row attends through its own columns only, with no mask, exactly as a single reply decodes.

    A padding mask changes nothing a row attends to, but it changes how the sums are grouped: sdpa takes another
    path for grouped-query heads with a mask, and longer rows round differently. In fp32 that moves logits by
    ~1e-5, but bitsandbytes' 4-bit CPU kernel rounds its inputs to bf16, so such a difference now and then flips a
    rounding, grows from layer to layer (~0.2 in the logits on SmolLM2) and changes a greedy reply. Row by row,
    every row of a batch attends as `tailor chat` attends for it alone, bit for bit.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if row_starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = [sdpa_attention_forward(module, query[row:row + 1], key[row:row + 1, :, start:], value[row:row + 1, :, start:],
                                   None, **kwargs)[0] for row, start in enumerate(row_starts)]
    return torch.cat(rows), None


def _use_row_attention(model) -> bool:
    """Switch a model that attends with sdpa to `_row_attention` (the same, unless a batch passes row starts)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation == ROW_ATTENTION:
        return True
    if model.config._attn_implementation != "sdpa":
        return False  # eager, flash attention...: the padding mask it is
    AttentionInterface.register(ROW_ATTENTION, _row_attention)
    AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)
    model.set_attn_implementation(ROW_ATTENTION)
    return model.config._attn_implementation == ROW_ATTENTION
