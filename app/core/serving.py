"""Serving many personas on one loaded base to many clients at once: a request queue and one worker thread.

The worker thread owns the model: callers (the HTTP server's event loop, a benchmark) only validate and enqueue a
request, then receive its text through a listener callback. Requests waiting together are answered together, in
one `generate()` call whose rows may use different personas: peft's `adapter_names=` runs each row through its own
LoRA matrices (its "mixed adapter batch"), so four clients talking to four personas cost about one decoding pass per
token instead of four. Rows end on their own (end of turn, stop string, token limit, or the client going away): a
row that has ended only rides along as padding until the longest row ends.

Only requests that sample alike share a batch: greedy ones with each other, sampled ones with the same temperature
and top-p, and a seeded request runs alone, so that a seed gives the same reply it gives in `tailor chat`. A batch
of equally long prompts computes each row exactly as `tailor chat` does; a shorter prompt is padded on the left,
and its masked attention rounds differently in bf16 (logits move by ~4e-3), which can flip a near-tie in a greedy
reply, as in every batched server.

Personas come from the library and are looked up again on every request, so one trained or imported while the
server runs is served from its next request on, without a restart.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from app.core.chat import BASE, ChatSession, GenerationSettings
from app.core.config import validate_adapter_name
from app.core.errors import TailorError
from app.core.library import AdapterEntry, Library
from app.core.templates import place_system_prompt, render

log = logging.getLogger("tailor.serve")

MAX_BATCH = 8
"""Requests answered in one generate() call; more wait for the next one."""
GATHER_S = 0.02
"""How long the worker waits for more requests before starting a batch when it expects no more."""
GATHER_MAX_S = 0.25
"""How long it waits, at most, for as many requests as the last round had. Clients whose replies ended together
send their next requests some milliseconds apart (more on a busy machine); starting with the first alone would make
the rest queue behind it for a whole reply, so waiting a fraction of a second to batch them pays many times over."""
PEFT_BASE_ROW = "__base__"
"""peft's name for a row of a mixed batch that uses no adapter."""

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


class ServeError(TailorError):
    """A request the engine will not run; `status` is the HTTP status a server should answer with."""

    def __init__(self, message: str, status: int = 400, hint: str | None = None, param: str | None = None):
        super().__init__(message, hint)
        self.status = status
        self.param = param
        """The request field at fault, where there is one."""


@dataclass(frozen=True)
class PersonaStatus:
    """A persona in the library as the server sees it: usable here, or why not."""

    name: str
    created: int
    """Unix time the adapter folder was made (what OpenAI's model list calls `created`)."""
    problem: str | None = None

    @property
    def available(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class ServeRequest:
    model: str
    """A persona name or BASE."""
    messages: list[dict[str, str]]
    settings: GenerationSettings
    stop: tuple[str, ...] = ()
    """Strings that end the reply where they first appear (not included in it)."""


@dataclass(frozen=True)
class Delta:
    """A piece of reply text, in order."""

    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    """'stop' (end of turn or a stop string), 'length' (max tokens), or 'cancelled' (the caller went away)."""
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500


Event = Delta | Finished | Failed
Listener = Callable[[Event], None]


@dataclass
class Generation:
    """One request on its way through the engine. `cancel()` may be called from any thread."""

    id: int
    request: ServeRequest
    prompt_ids: list[int]
    max_new_tokens: int
    listener: Listener
    mixable: bool = True
    """False for a persona peft cannot run in a mixed batch (DoRA): it shares a batch only with itself."""
    adapter_key: str | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _stop_text: StopText | None = None

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class StopText:
    """Incremental reply text that ends at the first stop string, holding back any tail that might begin one, so a
    client never sees part of a stop string."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [stop for stop in stops if stop]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, text: str) -> str:
        """Take the whole reply so far; return the part that is now safe to send."""
        self.text = text
        hits = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        hold = max((overlap(text, stop) for stop in self.stops), default=0)
        return self._release(len(text) - hold)

    def flush(self) -> str:
        """At the end of the reply nothing can begin a stop string any more."""
        return "" if self.stopped else self._release(len(self.text))

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece


def overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a beginning of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


def sampling_key(settings: GenerationSettings) -> tuple:
    """Requests with equal keys can share one generate() call: everything but the length, and for greedy requests
    also everything about sampling (it does not apply)."""
    values = {key: value for key, value in dataclasses.asdict(settings).items() if key != "max_new_tokens"}
    if settings.greedy:
        values = {key: value for key, value in values.items() if key not in ("temperature", "top_p", "top_k", "seed")}
    return tuple(sorted(values.items()))


def _recent_repetition_penalty(settings: GenerationSettings, pad_lengths: list[int]):
    """The chat engine's repetition penalty (over each row's last `repetition_window` tokens), row by row, so the
    left padding of a shorter prompt never counts as a recent token: each row is penalised as it would be alone."""
    from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor

    penalty, window = RepetitionPenaltyLogitsProcessor(settings.repetition_penalty), settings.repetition_window

    class RecentRepetitionPenaltyPerRow(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for row, padding in enumerate(pad_lengths):
                start = max(padding, input_ids.shape[1] - window)
                scores[row:row + 1] = penalty(input_ids[row:row + 1, start:], scores[row:row + 1])
            return scores

    return RecentRepetitionPenaltyPerRow()


def generate_options(settings: GenerationSettings, pad_lengths: list[int]) -> dict:
    """generate()'s decoding arguments for a batch, as ChatSession.stream sets them for one reply."""
    from transformers import LogitsProcessorList

    processors = [_recent_repetition_penalty(settings, pad_lengths)] if settings.repetition_penalty != 1 else []
    options = dict(do_sample=not settings.greedy, logits_processor=LogitsProcessorList(processors),
                   repetition_penalty=1.0)  # transformers' own penalty would count the whole prompt, padding too
    if settings.greedy:
        options.update(temperature=None, top_p=None, top_k=None)
    else:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return options


class ServingEngine:
    """One ChatSession shared by many clients; see the module docstring.

    `names` limits serving to those personas (None: every persona in the library that fits the base, including
    ones added later). `max_batch=1` answers requests strictly one at a time (the benchmark's reference).
    """

    def __init__(self, session: ChatSession, library: Library | None, names: list[str] | None = None,
                 max_batch: int = MAX_BATCH):
        if max_batch < 1:
            raise TailorError(f"The batch size must be at least 1, not {max_batch}.")
        self.session = session
        self.library = library
        self.names = list(names) if names is not None else None
        self.max_batch = max_batch
        self.context_tokens = session.context_length
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self.started = time.time()
        self.running = 0
        self.largest_batch = 0
        self._demand = 1
        """Requests in the last round: the batch that ran plus those that queued behind it."""
        """The most requests answered together so far (tests and the benchmark check batching happens)."""
        self._ids = itertools.count(1)
        self._queue: deque[Generation] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._cancel_running = False
        self._thread: threading.Thread | None = None
        self._eos_ids = set(self._end_of_turn_ids())

    # Personas

    def personas(self) -> list[PersonaStatus]:
        """Every persona this server offers or would offer, read from the library now."""
        if self.library is None:
            entries = list(self.session.adapters.values())
        elif self.names is None:
            entries = self.library.entries()
        else:
            entries = [self.library.get(name) if self.library.exists(name) else None for name in self.names]
            entries = [entry for entry in entries if entry is not None]
        return [PersonaStatus(entry.name, _created(entry), self.session.incompatibility(entry)) for entry in entries]

    def model_names(self) -> list[str]:
        return [BASE, *(persona.name for persona in self.personas() if persona.available)]

    def load_available(self, progress: Callable[[str], None] | None = None) -> list[PersonaStatus]:
        """Load every available persona now (at start-up, so the first requests do not wait for it)."""
        personas = self.personas()
        for persona in personas:
            if persona.available:
                if progress:
                    progress(f"Loading persona '{persona.name}'…")
                self._ensure_loaded(persona.name)
        return personas

    def system_prompt(self, model: str) -> str | None:
        """The persona's stored system prompt, as the library has it now."""
        entry = self._entry(model)
        return entry.system_prompt if entry else None

    def settings_for(self, model: str, given: dict) -> GenerationSettings:
        """Generation settings for a request: what it gives, else the persona's recommended ones (its manifest's
        "sampling"), else the chat defaults; no length limit but the context unless it gives one."""
        entry = self._entry(model)
        recommended = GenerationSettings(max_new_tokens=self.context_tokens).with_sampling(
            (entry.manifest or {}).get("sampling") if entry else None)
        try:
            return dataclasses.replace(recommended, **given)
        except TailorError as exc:
            raise ServeError(f"Invalid generation settings: {exc.message}") from None

    def _entry(self, model: str) -> AdapterEntry | None:
        if model == BASE:
            return None
        if self.library is None:
            return self.session.adapters.get(model)
        try:
            return self.library.get(validate_adapter_name(model))
        except TailorError:  # not a name an adapter can have, or not in the library
            return None


    def _ensure_loaded(self, name: str) -> str:
        """The peft key of persona `name`, loading it (or its newer version of the same name) first."""
        entry = self.library.get_usable(name) if self.library is not None else self.session.adapters[name]
        loaded = self.session.adapters.get(name)
        if loaded is not None and loaded.manifest != entry.manifest:
            log.info("Persona '%s' changed in the library; loading the new version.", name)
            self.session.close(name)
        self.session.load_adapter(entry)
        return self.session.adapter_key(name)

    # Requests

    def submit(self, request: ServeRequest, listener: Listener) -> Generation:
        """Check and queue a request; its text and end come to `listener`, called on the worker thread.

        Raises ServeError (404 for an unknown or unusable model, 400 for a conversation that cannot fit) before
        anything is queued. Called from a server's thread pool: tokenizing is not for the event loop either.
        """
        self._check_model(request.model)
        if not request.messages:
            raise ServeError("'messages' is empty; send at least one message.")
        messages = self.trim(request.messages, request.settings.max_new_tokens)
        if len(messages) < len(request.messages):
            log.info("Trimmed %d oldest message(s) so the conversation fits %d tokens.",
                     len(request.messages) - len(messages), self.context_tokens)
        prompt_ids = self.prompt_ids(messages)
        max_new_tokens = min(request.settings.max_new_tokens, self.context_tokens - len(prompt_ids))
        generation = Generation(next(self._ids), request, prompt_ids, max_new_tokens, listener,
                                mixable=self._mixable(request.model), _stop_text=StopText(request.stop))
        with self._wake:
            if self._closing:
                raise ServeError("The server is shutting down.", status=503)
            self._queue.append(generation)
            self._wake.notify()
        return generation

    def trim(self, messages: list[dict[str, str]], max_new_tokens: int) -> list[dict[str, str]]:
        """The conversation as the chat engine cuts it to the context: oldest turns out, system prompt kept."""
        try:
            return self.session.fit_to_context(messages, GenerationSettings(max_new_tokens=max_new_tokens)).messages
        except TailorError as exc:
            raise ServeError(exc.message, hint=exc.hint) from None

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's tokens exactly as the chat engine renders them (its template, its system-prompt placement)."""
        tokenizer = self.session.tokenizer
        return list(render(tokenizer, place_system_prompt(tokenizer, messages), add_generation_prompt=True,
                           tokenize=True, return_dict=True)["input_ids"])

    def _mixable(self, model: str) -> bool:
        if model == BASE or self.library is None:
            return True
        try:
            return not self.library.get(model).adapter_config().get("use_dora")
        except (OSError, ValueError):
            return True  # a damaged adapter fails when it is loaded, with the reason

    def _check_model(self, model: str) -> None:
        if model == BASE:
            return
        personas = {persona.name: persona for persona in self.personas()}
        available = ", ".join(self.model_names())
        if model not in personas:
            raise ServeError(f"The model '{model}' does not exist. Available models: {available}.", status=404)
        if not personas[model].available:
            raise ServeError(f"The persona '{model}' cannot be served on {self.session.resolved.model_id}: "
                             f"{personas[model].problem}. Available models: {available}.", status=404)

    # The worker thread

    def start(self) -> ServingEngine:
        self._thread = threading.Thread(target=self._work, name="tailor-serve", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30) -> None:
        """Stop taking requests, end the running batch at its next token, fail what is still queued."""
        with self._wake:
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            self._wake.notify_all()
        for generation in queued:
            generation.cancel()
            self._finish(generation, FINISH_CANCELLED)
        self._cancel_running = True
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self.running = len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                self._run_batch(batch)
                self._demand = len(batch) + len(self._queue)
            except Exception as exc:  # one bad batch must not end the server; its clients hear why
                log.exception("Generation failed for requests %s", [generation.id for generation in batch])
                message = exc.message if isinstance(exc, TailorError) else "Generation failed; the server log says why."
                for generation in batch:
                    if not generation.done:
                        generation.finish_reason = "error"
                        self.counts["failed"] += 1
                        generation.listener(Failed(message, exc.status if isinstance(exc, ServeError) else 500))
            finally:
                self.running = 0

    def _next_batch(self) -> list[Generation] | None:
        """The oldest waiting request plus every other waiting one that samples alike, up to max_batch."""
        with self._wake:
            while not self._queue and not self._closing:
                self._wake.wait()
            wanted = min(self.max_batch, max(2, self._demand))
            deadline = time.monotonic() + (GATHER_MAX_S if self._demand > 1 else GATHER_S)
            while 1 < self.max_batch and len(self._queue) < wanted and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.wait(remaining)
            if self._closing:
                return None
            first = self._queue.popleft()
            batch = [first]
            for generation in list(self._queue):
                if len(batch) >= self.max_batch:
                    break
                if self._fits_batch(generation, batch):
                    self._queue.remove(generation)
                    batch.append(generation)
        return batch

    @staticmethod
    def _fits_batch(generation: Generation, batch: list[Generation]) -> bool:
        first, settings = batch[0], generation.request.settings
        if not settings.greedy and (settings.seed is not None or first.request.settings.seed is not None):
            return False  # a seed promises the reply it gives alone
        if sampling_key(settings) != sampling_key(first.request.settings):
            return False
        same_persona = all(other.request.model == generation.request.model for other in batch)
        return same_persona or (generation.mixable and all(other.mixable for other in batch))

    def _run_batch(self, batch: list[Generation]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        batch = [generation for generation in batch if not self._skip_cancelled(generation)]
        if not batch:
            return
        for generation in batch:
            if generation.request.model != BASE:
                generation.adapter_key = self._ensure_loaded(generation.request.model)
        session, engine = self.session, self
        pad = session.tokenizer.pad_token_id if session.tokenizer.pad_token_id is not None else min(self._eos_ids)
        width = max(len(generation.prompt_ids) for generation in batch)
        # Left padding: every row's next token then comes out of the same (last) position.
        input_ids = torch.tensor([[pad] * (width - len(g.prompt_ids)) + g.prompt_ids for g in batch], device=session.device)
        attention_mask = torch.tensor([[0] * (width - len(g.prompt_ids)) + [1] * len(g.prompt_ids) for g in batch],
                                      device=session.device)

        class RowsDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([g.done or g.cancelled or engine._cancel_running for g in batch],
                                    device=input_ids.device)

        settings = batch[0].request.settings
        pad_lengths = [width - len(generation.prompt_ids) for generation in batch]
        options = dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad,
                       max_new_tokens=max(generation.max_new_tokens for generation in batch),
                       streamer=_BatchStreamer(self, batch), stopping_criteria=StoppingCriteriaList([RowsDone()]),
                       **generate_options(settings, pad_lengths))
        keys = [generation.adapter_key for generation in batch]
        if len(set(keys)) == 1:
            session.select(batch[0].request.model)  # one persona for every row: peft's plain (faster) path
        else:
            options["adapter_names"] = [key or PEFT_BASE_ROW for key in keys]
        with torch.inference_mode():
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            session.model.generate(**options)
        for generation in batch:
            if not generation.done:  # generate() ended every row that was still running: cancelled by close()
                self._finish(generation, FINISH_CANCELLED)

    def _skip_cancelled(self, generation: Generation) -> bool:
        if generation.cancelled:
            self._finish(generation, FINISH_CANCELLED)
        return generation.cancelled

    def _take_token(self, generation: Generation, token: int) -> None:
        """One new token for a running row: text out to its listener, and the row's end when it has come."""
        if generation.cancelled:
            self._finish(generation, FINISH_CANCELLED)
            return
        if token in self._eos_ids:
            self._finish(generation, FINISH_STOP)
            return
        generation.tokens.append(token)
        text = self.session.tokenizer.decode(generation.tokens, skip_special_tokens=True)
        # A character split over several tokens decodes as U+FFFD until its last token arrives.
        if not text.endswith("\ufffd"):
            piece = generation._stop_text.feed(text)
            if piece:
                generation.listener(Delta(piece))
        if generation._stop_text.stopped:
            self._finish(generation, FINISH_STOP)
        elif len(generation.tokens) >= generation.max_new_tokens:
            self._finish(generation, FINISH_LENGTH)

    def _finish(self, generation: Generation, reason: str) -> None:
        if generation.done:
            return
        if reason != FINISH_CANCELLED:
            piece = generation._stop_text.flush()
            if piece:
                generation.listener(Delta(piece))
        generation.finish_reason = reason
        self.counts["cancelled" if reason == FINISH_CANCELLED else "completed"] += 1
        generation.listener(Finished(reason, len(generation.prompt_ids), len(generation.tokens)))

    def _end_of_turn_ids(self) -> list[int]:
        """Tokens that end a reply: the tokenizer's end of sequence and whatever the model's generation config adds."""
        ids = self.session.base_model.generation_config.eos_token_id
        ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
        return [token for token in [*ids, self.session.tokenizer.eos_token_id] if token is not None]


class _BatchStreamer:
    """transformers calls `put` with the prompt once, then with each step's new token per row."""

    def __init__(self, engine: ServingEngine, batch: list[Generation]):
        self.engine, self.batch, self.prompt_seen = engine, batch, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for generation, token in zip(self.batch, value.reshape(-1).tolist()):
            if not generation.done:
                self.engine._take_token(generation, token)

    def end(self) -> None:
        pass


def _created(entry: AdapterEntry) -> int:
    try:
        return int(entry.path.stat().st_mtime)
    except OSError:
        return int(time.time())
