"""One base model loaded once, many persona adapters on top of it, chosen per message.

Every adapter the user opens is loaded into the same PeftModel under its own key, and so is every mix built from
them; choosing a persona for a message only changes which low-rank matrices the LoRA layers use, so no base weights
are reloaded. "base" runs with no adapter active at all.

Why switching does not call peft's `set_adapter`: that also flips `requires_grad` on every adapter's every matrix,
so its cost grows with the number of adapters loaded (about 100 ms with 20 on SmolLM2). For inference only the
active-adapter list of each LoRA layer matters; `_select` sets just that, in time independent of how many
personas are open. tests/core/test_chat.py checks it gives exactly the logits `set_adapter` gives.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from app.core import skinny_linear
from app.core.data import with_system_prompt
from app.core.errors import AdapterError, TailorError
from app.core.library import AdapterEntry, BaseProfile, Library, adapter_fit
from app.core.mixing import MixSpec, combine, mix_problem
from app.core.models import Progress, ResolvedBase, load_model, load_tokenizer, pick_device, resolve_base
from app.core.omp_pool import hands_the_cpus_back
from app.core.templates import place_system_prompt, prompt_ids, render

BASE = "base"
BASE_LABEL = "Base (no adapter)"


GREEDY_BELOW = 1e-3
"""Temperatures below this decode greedily."""


@dataclass(frozen=True)
class GenerationSettings:
    """How a reply is decoded. The defaults follow the local-LLM apps people already use (Ollama's: top-k 40, top-p
    0.9, repeat penalty 1.1 over the last 64 tokens; a slightly cooler temperature, 0.7 instead of 0.8, for small
    models that drift). Greedy decoding of a small model tends to fall into loops ("Arr, matey! Arr, matey! ...");
    sampling plus a penalty on recent repeats keeps it talking."""

    max_new_tokens: int = 256
    """Upper bound on the reply length in tokens."""
    temperature: float = 0.7
    """0 means greedy (the same reply every time); higher values give more varied replies."""
    top_p: float = 0.9
    """Sample only from the most likely tokens whose probabilities add up to this (ignored when greedy)."""
    top_k: int = 40
    """Sample only from this many most likely tokens; 0 means no limit (ignored when greedy)."""
    repetition_penalty: float = 1.1
    """Divides the score of every token used in the last `repetition_window` tokens (prompt and reply); 1 is off.
    Applies to greedy decoding too, where loops are most likely."""
    repetition_window: int = 64
    """How many of the most recent tokens the repetition penalty looks at (llama.cpp's repeat_last_n)."""
    seed: int | None = None
    """Fixes sampling, so a sampled reply can be repeated and compare mode gives every column the same draws."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise TailorError(f"Max new tokens must be at least 1, not {self.max_new_tokens}.")
        if not 0 <= self.temperature <= 5:
            raise TailorError(f"Temperature must be 0 (greedy) or more, up to 5, not {self.temperature:g}.")
        if not 0 < self.top_p <= 1:
            raise TailorError(f"Top-p must be more than 0 and at most 1, not {self.top_p:g}.")
        if self.top_k < 0:
            raise TailorError(f"Top-k must be 0 (no limit) or more, not {self.top_k}.")
        if not 1 <= self.repetition_penalty <= 3:
            raise TailorError(f"Repetition penalty must be between 1 (off) and 3, not {self.repetition_penalty:g}.",
                              "1.1 is the usual value; higher values start to garble replies.")
        if self.repetition_window < 1:
            raise TailorError(f"The repetition window must be at least 1 token, not {self.repetition_window}.")

    @property
    def greedy(self) -> bool:
        # Dividing the logits by a temperature this close to 0 overflows them to inf (then NaN probabilities, and
        # sampling fails); the limit of sampling as the temperature goes to 0 is greedy decoding anyway.
        return self.temperature < GREEDY_BELOW

    def sampling(self) -> dict[str, float | int]:
        """The decoding choices a persona can recommend (its manifest's "sampling"), without length or seed."""
        return {name: getattr(self, name) for name in SAMPLING_KEYS}

    def with_sampling(self, recorded: dict[str, Any] | None) -> GenerationSettings:
        """These settings with a persona's recommended ones (a manifest's "sampling") in place; unknown keys and
        values out of range are ignored, so a hand-edited or newer manifest never stops the chat."""
        settings = self
        for name, value in (recorded or {}).items():
            if name in SAMPLING_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    settings = GenerationSettings(**{**asdict(settings), name: type(getattr(self, name))(value)})
                except TailorError:
                    continue
        return settings

    def describe(self) -> str:
        penalty = (f"repetition penalty {self.repetition_penalty:g} over the last {self.repetition_window} tokens"
                   if self.repetition_penalty > 1 else "no repetition penalty")
        if self.greedy:
            return f"greedy (no randomness), {penalty}, up to {self.max_new_tokens} new tokens"
        seed = "random" if self.seed is None else self.seed
        return (f"temperature {self.temperature:g}, top-p {self.top_p:g}, top-k {self.top_k or 'off'}, {penalty}, "
                f"seed {seed}, up to {self.max_new_tokens} new tokens")


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
"""GenerationSettings fields a persona's manifest may recommend under "sampling"."""


def recommend_sampling(library: Library, name: str, changes: dict[str, float | int] | None) -> AdapterEntry:
    """Save decoding settings as the ones the persona recommends (its manifest's "sampling", which chat, serve,
    the report card, bundles and the Ollama export read), over what it recommends already; None removes the
    recommendation, so Tailor's defaults apply again.

    Values are checked as GenerationSettings checks a flag (a TailorError names the one out of range), so a saved
    setting always applies. Read, merge and write happen under the library's lock: two writers never lose each
    other's change, and a reader sees the old manifest or the new one.
    """
    unknown = sorted(set(changes or {}) - set(SAMPLING_KEYS))
    if unknown:
        raise TailorError(f"'{unknown[0]}' is not a decoding setting a persona can recommend.",
                          f"These are: {', '.join(SAMPLING_KEYS)}.")
    with library.lock():
        entry = library.get_usable(name)
        if changes is None:
            return library.update_manifest(name, {"sampling": None})
        # What it recommends already, as chat reads it (a value chat ignores is not kept).
        current = GenerationSettings().with_sampling(entry.sampling).sampling()
        sampling = {key: current[key] for key in SAMPLING_KEYS if key in (entry.sampling or {})} | changes
        GenerationSettings(**sampling)
        return library.update_manifest(name, {"sampling": sampling})


def _logits_processors(settings: GenerationSettings) -> list:
    """transformers' repetition penalty, but over the recent tokens only.

    transformers' RepetitionPenaltyLogitsProcessor penalises every token of the whole input: the chat template's
    markup, the persona's system prompt and every earlier turn. In a persona chat that pushes the model away from
    the persona's own words (the "Arr" and "matey" the system prompt and the last reply used) and, as the
    conversation grows, from ever more of the common words, so grammar suffers. Loops are local; penalising the
    last `repetition_window` tokens (what llama.cpp's repeat_last_n does) stops them without those side effects.
    """
    if settings.repetition_penalty == 1:
        return []
    from transformers import RepetitionPenaltyLogitsProcessor

    window = settings.repetition_window

    class RecentRepetitionPenalty(RepetitionPenaltyLogitsProcessor):
        def __call__(self, input_ids, scores):
            return super().__call__(input_ids[:, -window:], scores)

    return [RecentRepetitionPenalty(settings.repetition_penalty)]


@dataclass(frozen=True)
class FittedPrompt:
    """A conversation cut to what the model can read, and what was left out."""

    messages: list[dict[str, str]]
    dropped: int
    """How many of the oldest messages (after the system prompt) were left out."""
    context_length: int

    @property
    def note(self) -> str | None:
        if not self.dropped:
            return None
        return (f"This conversation is longer than the model can read at once ({self.context_length} tokens): the "
                f"oldest {self.dropped} message{'s' if self.dropped != 1 else ''} "
                f"{'are' if self.dropped != 1 else 'is'} left out of what it sees now; the system prompt is kept.")


class StopFlag(Protocol):
    """Anything the generating thread can poll between tokens (a threading.Event, or a request-scoped flag)."""

    def is_set(self) -> bool: ...


def conversation_record(history: list[dict[str, str]], system_prompt: str | None) -> dict:
    """A conversation as one OpenAI-chat training example: {"messages": [system?, user, assistant, ...]}."""
    if not any(message["role"] == "assistant" and message["content"].strip() for message in history):
        raise TailorError("This conversation has no reply yet, so there is nothing to learn from.",
                          "Send a message and let the persona answer before saving.")
    return {"messages": with_system_prompt(history, system_prompt)}


def save_conversation(path: str | Path, history: list[dict[str, str]], system_prompt: str | None) -> Path:
    """Write the conversation as a one-line JSONL file the training wizard reads as an OpenAI-chat dataset."""
    path = Path(path).expanduser()
    path.write_text(json.dumps(conversation_record(history, system_prompt), ensure_ascii=False) + "\n", encoding="utf-8")
    return path


@contextmanager
def _cpu_packing_kept(model) -> Iterator[None]:
    """Keep bitsandbytes' CPU-packed 4-bit layers packed while peft takes state_dicts.

    On CPUs with AVX512-BF16, bitsandbytes repacks each 4-bit layer on its first inference pass (about 3x faster)
    and unpacks it whenever a state_dict is taken, which peft does on every adapter load and save. That round trip
    re-quantizes the layer's scales, so every load would nudge the base model (logits move by ~1e-3, a random walk)
    and switching back to a persona would not give the same logits. peft reads only the adapter entries of those
    state_dicts, so the packed layers are reported as plain while peft works, and stay packed.
    """
    packed = [module.weight.quant_state for module in model.modules()
              if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    for state in packed:
        state.packing_format_for_cpu = False
    try:
        yield
    finally:
        for state in packed:
            state.packing_format_for_cpu = True


def base_for(entries: list[AdapterEntry], base: str | None, quant: str | None) -> tuple[str, str]:
    """The base to load for these adapters: the one asked for, else the one they were made on (as the user named
    it then, from the first adapter that says), else the bundled model; the precision asked for, else 'auto' (a
    LoRA adapter trained on the 4-bit base works, and usually better, on the unquantised one)."""
    made_with_base, _ = next((entry.trained_with for entry in entries if entry.manifest), (None, None))
    return base or made_with_base or "default", quant or "auto"


CHAT_PRECISIONS = ("auto", "4bit", "8bit", "none")
COMFORTABLE_SHARE = 0.5
"""'auto' holds the base unquantised only if its weights take at most this share of the free memory; the rest is
room for the KV cache, the activations, the adapters and whatever else the computer is running."""
_DTYPE_LABELS = {"bfloat16": "16-bit (bf16)", "float16": "16-bit (fp16)", "float32": "full precision (fp32)"}


@dataclass(frozen=True)
class ChatPrecision:
    """How chat holds the base model in memory, and why."""

    quant: str
    """'4bit', '8bit' or 'none' (unquantised, in `dtype`)."""
    dtype: str | None
    """The torch dtype name an unquantised base is held in ('bfloat16', 'float16' or 'float32'); None for a
    quantised one, whose compute dtype app.core.precision picks."""
    reason: str

    @property
    def label(self) -> str:
        return {"4bit": "4-bit (NF4)", "8bit": "8-bit"}.get(self.quant) or _DTYPE_LABELS[self.dtype]

    def describe(self) -> str:
        return f"{self.label}: {self.reason}"


def generation_dtype(device: str) -> tuple[str, str]:
    """(torch dtype name, why) chat computes in on `device`: app.core.precision's choice for generation (bf16 or
    fp16 on a GPU; fp32 on a CPU: one-token-at-a-time decoding of the 4-bit base measured 2x slower in bf16 with
    AMX and only 1.06x faster with AVX512-BF16 alone (bench/cpu_compute_dtype.py), and of the unquantised base only 4%
    faster on AMX, within noise, while bf16 rounds every weight (bench/chat_precision.py))."""
    from app.core.precision import GENERATION, compute_dtype

    precision = compute_dtype(device, GENERATION)
    return str(precision.dtype).removeprefix("torch."), precision.reason


def choose_precision(requested: str, weight_count: int, device: str, free_bytes: int) -> ChatPrecision:
    """The precision to chat in: what the user picked, or for 'auto' the base unquantised when it fits comfortably
    in free memory (it answers better: a 4-bit 135M model loses much of its quality) and 4-bit only when it must."""
    if requested not in CHAT_PRECISIONS:
        raise TailorError(f"Unknown chat precision '{requested}'.", f"Use one of: {', '.join(CHAT_PRECISIONS)}.")
    dtype, why = generation_dtype(device)
    if requested != "auto":
        return ChatPrecision(requested, dtype if requested == "none" else None, "as chosen")
    needed = weight_count * (4 if dtype == "float32" else 2)
    where = "GPU memory" if device.startswith("cuda") else "RAM"
    amounts = f"{needed / 1e9:.2f} GB of weights, {free_bytes / 1e9:.1f} GB of {where} free"
    if needed <= COMFORTABLE_SHARE * free_bytes:
        return ChatPrecision("none", dtype, f"chosen automatically, it fits comfortably ({amounts}); {why}")
    return ChatPrecision("4bit", None, f"chosen automatically, the full model would not fit comfortably ({amounts})")


class ChatSession:
    @hands_the_cpus_back
    def __init__(self, base: str = "default", quant: str = "auto", device: str | None = None,
                 progress: Progress | None = None, trust_remote_code: bool = False):
        import torch

        from app.core.gpu import free_memory_bytes

        self.resolved: ResolvedBase = resolve_base(base, progress)
        self.device = device or pick_device()
        self.profile = BaseProfile.from_folder(self.resolved.folder, self.resolved.model_id)
        weight_count = sum(math.prod(shape) for shape in self.profile.weight_shapes.values())
        self.precision = choose_precision(quant, weight_count, self.device, free_memory_bytes(self.device))
        self.quant = self.precision.quant
        self.tokenizer = load_tokenizer(self.resolved.folder, trust_remote_code)
        self.context_length = self._context_length()
        """The most tokens the model reads at once: prompt and reply together."""
        if progress:
            progress(f"Loading {self.resolved.model_id} on {self.device.upper()} in {self.precision.describe()}…")
        self.base_model = load_model(self.resolved.folder, self.quant, self.device, trust_remote_code,
                                     dtype=getattr(torch, generation_dtype(self.device)[0]))
        self.base_model.config.use_cache = True
        self.base_model.eval()
        skinny_linear.install_where_it_pays(self.base_model, self.device)
        self._warm_up()
        self.peft_model = None
        """The PeftModel wrapping `base_model`, created when the first adapter is loaded."""
        self.adapters: dict[str, AdapterEntry] = {}
        """Adapters opened from the library, by name."""
        self.mixes: dict[str, MixSpec] = {}
        """Mixes built in this session and not saved yet."""
        # Library names may hold '.' and spaces, which peft's module dicts refuse, so each gets a neutral key.
        self._keys: dict[str, str] = {}
        self._key_counter = itertools.count()
        self._lora_layers: list = []
        # generate() is not re-entrant on one model: two personas answering at once would race on the selection.
        self._lock = threading.RLock()

    @property
    def model(self):
        return self.peft_model if self.peft_model is not None else self.base_model

    def choices(self) -> list[str]:
        return [BASE, *self.adapters, *self.mixes]

    def base_description(self) -> dict:
        """How adapters made on this session's base record it in their manifest."""
        return {"id": self.resolved.model_id, "source": self.resolved.source, "fingerprint": self.profile.fingerprint,
                "architecture": self.resolved.config().get("model_type")}

    def incompatibility(self, entry: AdapterEntry) -> str | None:
        """Why this adapter cannot be used on the loaded base, or None if it can."""
        return adapter_fit(entry, self.profile)

    def system_prompt(self, choice: str) -> str | None:
        """The persona's own system prompt; a mix speaks with the voice of its most heavily weighted parent."""
        if choice in self.adapters:
            return self.adapters[choice].system_prompt
        if choice in self.mixes:
            return self.system_prompt(self.mixes[choice].heaviest_parent)
        return None

    def adapter_key(self, choice: str) -> str:
        if choice not in self._keys:
            opened = ", ".join(self.choices())
            raise AdapterError(f"'{choice}' is not open in this chat.", f"Open it first; open now: {opened}.")
        return self._keys[choice]

    @hands_the_cpus_back
    def load_adapter(self, entry: AdapterEntry) -> str:
        """Load (once) and return the adapter's name; refuses an adapter that does not fit, with the reason."""
        if entry.name in self.adapters:
            return entry.name
        reason = self.incompatibility(entry)
        if reason:
            raise AdapterError(f"Cannot use '{entry.name}' with {self.resolved.model_id}: {reason}.")
        from peft import PeftModel

        with self._lock, _cpu_packing_kept(self.base_model):
            key = self._new_key()
            try:
                if self.peft_model is None:
                    self.peft_model = PeftModel.from_pretrained(self.base_model, str(entry.path), adapter_name=key)
                else:
                    self.peft_model.load_adapter(str(entry.path), adapter_name=key)
            except (RuntimeError, ValueError, OSError, KeyError) as exc:
                # adapter_fit catches shape mismatches first; this is for what only peft can tell (unknown options…).
                if self.peft_model is not None and key in self.peft_model.peft_config and len(self.peft_model.peft_config) > 1:
                    self.peft_model.delete_adapter(key)  # half-injected layers would only hold memory
                raise AdapterError(f"Cannot use '{entry.name}' with {self.resolved.model_id}: {str(exc).splitlines()[0]}") from exc
            self.peft_model.eval()
            self.adapters[entry.name] = entry
            self._keys[entry.name] = key
            self._refresh_layers()
        return entry.name

    @hands_the_cpus_back
    def add_mix(self, name: str, spec: MixSpec) -> str:
        """Build the mix `spec` (over adapters opened here) as a new choice called `name`."""
        if name in self._keys or name == BASE:
            raise AdapterError(f"'{name}' is already open in this chat.", "Give the mix another name.")
        missing = [parent for parent in spec.names if parent not in self.adapters]
        if missing:
            raise AdapterError(f"Open {', '.join(missing)} before mixing.")
        problem = mix_problem(spec, [self.adapters[parent] for parent in spec.names])
        if problem:
            raise AdapterError(f"Cannot mix these adapters: {problem}.")
        with self._lock, _cpu_packing_kept(self.base_model):
            key = self._new_key()
            combine(self.peft_model, [self._keys[parent] for parent in spec.names], spec, key)
            self.mixes[name] = spec
            self._keys[name] = key
            self._refresh_layers()
        return name

    @hands_the_cpus_back
    def close(self, choice: str) -> None:
        """Unload an adapter or mix, freeing its memory; the base and the other choices stay as they are."""
        key = self.adapter_key(choice)
        with self._lock, _cpu_packing_kept(self.base_model):
            self.peft_model.delete_adapter(key)
            self.adapters.pop(choice, None)
            self.mixes.pop(choice, None)
            del self._keys[choice]
            self._refresh_layers()

    @hands_the_cpus_back
    def export_adapter(self, choice: str, folder: Path) -> Path:
        """Save one open adapter or mix as a plain PEFT folder inside `folder`; returns the folder it wrote."""
        key = self.adapter_key(choice)
        with self._lock, _cpu_packing_kept(self.base_model):
            self.peft_model.save_pretrained(str(folder), selected_adapters=[key])
        # peft writes an adapter that is not called "default" into a sub-folder named after it.
        return Path(folder) / key

    def mark_saved(self, name: str, entry: AdapterEntry) -> None:
        """A mix written to the library is from now on that library adapter (same weights, same key)."""
        self.mixes.pop(name)
        self.adapters[name] = entry

    @staticmethod
    def prompt_messages(history: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
        return with_system_prompt(history, system_prompt)

    def fit_to_context(self, messages: list[dict[str, str]], settings: GenerationSettings = GenerationSettings()) -> FittedPrompt:
        """The conversation cut to what the model reads at once, room for the reply included: the oldest exchanges
        go first, the system prompt and the newest message stay. Raises only when the newest message alone is too
        long, since cutting it would answer a question the user did not ask."""
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        budget = self.context_length - min(settings.max_new_tokens, self.context_length // 2)
        dropped = 0
        while True:
            kept = system + turns[dropped:]
            length = self.prompt_length(kept)
            if length <= budget:
                return FittedPrompt(kept, dropped, self.context_length)
            if dropped >= len(turns) - 1:
                raise TailorError(f"This message is too long for {self.resolved.model_id}: with the system prompt it "
                                  f"is {length} tokens, and the model reads at most {self.context_length}, the reply "
                                  "included.", "Shorten the message, or lower Max new tokens.")
            dropped += 1
            # Start what is kept with a user turn: most templates need user and assistant to alternate from there.
            while dropped < len(turns) - 1 and turns[dropped]["role"] != "user":
                dropped += 1

    def prompt_length(self, messages: list[dict[str, str]]) -> int:
        """Tokens the model reads for this conversation, the generation prompt included."""
        return len(prompt_ids(self.tokenizer, messages))

    def select(self, choice: str) -> None:
        """Make `choice` (an open adapter, a mix, or BASE) the one the next forward pass uses."""
        with self._lock:
            keys = [] if choice == BASE else [self.adapter_key(choice)]
            # An empty active list makes every LoRA layer return its base layer's output untouched.
            for layer in self._lora_layers:
                layer._active_adapter = keys
            if keys:
                # peft's generate() looks up the active adapter's config on the model itself.
                self.peft_model.base_model.active_adapter = keys[0]

    def stream(self, messages: list[dict[str, str]], adapter: str = BASE, settings: GenerationSettings = GenerationSettings(),
               stop: StopFlag | None = None) -> Iterator[str]:
        """Yield the reply piece by piece as it is generated; setting `stop` ends it early."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        abandoned = threading.Event()

        class _StopFlag(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return abandoned.is_set() or bool(stop is not None and stop.is_set())

        if adapter != BASE:
            self.adapter_key(adapter)  # an unknown persona fails here, in the caller's thread, not in generate()
        fitted = self.fit_to_context(messages, settings)
        inputs = render(self.tokenizer, place_system_prompt(self.tokenizer, fitted.messages), add_generation_prompt=True,
                        return_tensors="pt", return_dict=True).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        room = self.context_length - inputs["input_ids"].shape[1]
        options = dict(**inputs, max_new_tokens=min(settings.max_new_tokens, room), do_sample=not settings.greedy,
                       streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopFlag()]),
                       logits_processor=LogitsProcessorList(_logits_processors(settings)),
                       repetition_penalty=1.0,  # transformers' own whole-prompt penalty stays off (see above)
                       pad_token_id=self.tokenizer.pad_token_id)
        if settings.greedy:
            options.update(temperature=None, top_p=None, top_k=None)
        else:
            options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    # torch starts every process from the same fixed seed, so "no seed" must draw a fresh one, or
                    # each `tailor chat --prompt` would give the same "random" reply.
                    torch.manual_seed(settings.seed) if settings.seed is not None else torch.seed()
                    self.select(adapter)
                    self.model.generate(**options)
            except BaseException as exc:  # re-raised in the consumer's thread below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="tailor-generate", daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            # A consumer that stops reading (closed generator) must not leave generate() running on.
            abandoned.set()
            worker.join()
        if failure:
            raise failure[0]

    def reply(self, messages: list[dict[str, str]], adapter: str = BASE, settings: GenerationSettings = GenerationSettings()) -> str:
        return "".join(self.stream(messages, adapter, settings)).strip()

    def compare(self, prompt: str, choices: list[str], settings: GenerationSettings,
                system_prompt: str | None = None) -> list[tuple[str, str]]:
        """The same prompt answered by each choice in turn, each with its own system prompt unless one is given,
        all with the same settings and seed, so the differences come from the adapters alone."""
        history = [{"role": "user", "content": prompt}]
        return [(choice, self.reply(self.prompt_messages(history, system_prompt if system_prompt is not None
                                                         else self.system_prompt(choice)), choice, settings))
                for choice in choices]

    def _warm_up(self) -> None:
        """One forward pass now, so one-time work on the first one (bitsandbytes repacks 4-bit layers for the CPU,
        seconds on a small model) happens while the user sees "Loading" rather than in the first reply."""
        import torch

        with torch.inference_mode():
            self.base_model(input_ids=torch.tensor([[self.tokenizer.eos_token_id]], device=self.device))

    def _context_length(self) -> int:
        """The model's trained context (config's max_position_embeddings), else the tokenizer's limit, else 2048."""
        config = self.resolved.config()
        text_config = config.get("text_config") or config
        for limit in (text_config.get("max_position_embeddings"), getattr(self.tokenizer, "model_max_length", None)):
            if isinstance(limit, int) and 0 < limit < 10_000_000:
                return limit
        return 2048

    def _new_key(self) -> str:
        return f"persona_{next(self._key_counter)}"

    def _refresh_layers(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._lora_layers = [module for module in self.peft_model.modules() if isinstance(module, BaseTunerLayer)]
