"""Serving many personas on one loaded base to many clients at once: a request queue and one worker thread.

The worker thread owns the model: callers (the HTTP server's event loop, a benchmark) only validate and enqueue a
request, then receive its text through a listener callback. The worker decodes every running request together,
one token per request per step, in a batch whose rows may use different personas (app.core.running_batch): four
clients talking to four personas cost about one decoding pass per token instead of four. Requests join the batch
between two steps, as they arrive, and leave it the moment they end (end of turn, stop string, token limit, or the
client going away), so nobody waits for someone else's reply to finish and no step computes an unwanted token.

Every row decodes with its own settings and its own random generator, so greedy and sampled requests share a batch,
and a seed gives the reply it gives in `tailor chat`. A row computes what `tailor chat` computes for it alone (its
prompt prefilled alone, its attention over its own tokens, its LoRA update as peft's, its 4-bit layers exactly).
Only the plain linear layers (an unquantised base, the LM head) sum a batch's rows in another order, which moves
fp32 logits in the last bit (~1e-6; app.core.skinny_linear), and a model that does not attend through sdpa falls
back to a padding mask (~1e-5): either can flip a near-tie, as in every batched server, and otherwise a reply equals
`tailor chat`'s (checked on whole replies of the bundled model, 4-bit and unquantised).

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
from app.core.running_batch import Row, RowSampler, RunningBatch
from app.core.config import validate_adapter_name
from app.core.errors import TailorError
from app.core.library import AdapterEntry, Library
from app.core.templates import prompt_ids

log = logging.getLogger("tailor.serve")

MAX_BATCH = 8
"""Requests decoded together at most; more wait in the queue and join as others end."""

SEEDS = (-2**63, 2**64 - 1)
"""The seeds torch's random generators take."""

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
    tokens: list[int] = field(default_factory=list)
    """The reply's tokens so far (its end-of-turn token not included)."""
    finish_reason: str | None = None
    joined_running: bool = False
    """Whether it joined a batch that was already decoding other requests."""
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


class ServingEngine:
    """One ChatSession shared by many clients; see the module docstring.

    `names` limits serving to those personas (None: every persona in the library that fits the base, including
    ones added later). `max_batch=1` answers requests strictly one at a time (the benchmark's reference).
    `on_step`, if set, is called on the worker thread before every decode step with the requests in it (tests and
    benchmarks watch the batching through it).
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
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "joined_running": 0}
        """Requests by how they ended; `joined_running`: those that joined a batch already decoding others."""
        self.started = time.time()
        self.running = 0
        """Requests decoding now."""
        self.largest_batch = 0
        """The most requests decoded together so far."""
        self.decode_steps = 0
        self.decoded_rows = 0
        """Decode steps taken and the rows they decoded, summed: their ratio is how full the batches ran."""
        self.on_step: Callable[[list[Generation]], None] | None = None
        self._ids = itertools.count(1)
        self._queue: deque[Generation] = deque()
        self._wake = threading.Condition()
        self._closing = False
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
        seed = given.get("seed")
        if seed is not None and not SEEDS[0] <= seed <= SEEDS[1]:
            raise ServeError(f"Invalid 'seed': it must be between {SEEDS[0]} and {SEEDS[1]}, not {seed}.", param="seed")
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
        return prompt_ids(self.session.tokenizer, messages)

    def _mixable(self, model: str) -> bool:
        entry = self._entry(model)  # the library's, or without one (the report card) the session's own
        if entry is None:
            return True
        try:
            return not entry.adapter_config().get("use_dora")
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
        """Stop taking requests, end the running ones before their next token, cancel what is still queued."""
        with self._wake:
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            self._wake.notify_all()
        for generation in queued:
            generation.cancel()
            self._finish(generation, FINISH_CANCELLED)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def mean_batch(self) -> float:
        """Rows per decode step so far, on average (0 before the first step)."""
        return self.decoded_rows / self.decode_steps if self.decode_steps else 0.0

    def _work(self) -> None:
        batch = RunningBatch(self.session)
        while True:
            joining = self._joiners(batch)
            if joining is None:
                break
            for generation in joining:
                self._join(batch, generation)
            self._drop_ended(batch)
            self.running = len(batch)
            if batch:
                self._step(batch)
        for row in batch.rows:
            self._finish(row.owner, FINISH_CANCELLED)
        self.running = 0

    def _joiners(self, batch: RunningBatch) -> list[Generation] | None:
        """The waiting requests that join the batch now, oldest first (None once closing). Waits for one while the
        batch is empty. A request that cannot join yet stops the ones behind it, so it is not overtaken forever."""
        with self._wake:
            while not self._queue and not batch and not self._closing:
                self._wake.wait()
            if self._closing:
                return None
            waiting = list(self._queue)
        joining: list[Generation] = []
        for generation in waiting:
            if not self._can_join(generation, batch, joining):
                break
            joining.append(generation)
        with self._wake:
            for generation in joining:
                if generation in self._queue:  # close() may have emptied the queue meanwhile
                    self._queue.remove(generation)
        return joining

    def _can_join(self, generation: Generation, batch: RunningBatch, joining: list[Generation]) -> bool:
        running = [row.owner for row in batch.rows]
        if len(running) + len(joining) >= self.max_batch:
            return False
        if (running or joining) and not batch.joinable:
            return False
        together = [*running, *joining, generation]
        if len({other.request.model for other in together}) > 1 and not all(other.mixable for other in together):
            return False
        # A persona changed in the library is reloaded, which running requests on its old version must not see.
        return not (generation.request.model in batch.personas and self._changed(generation.request.model))

    def _changed(self, name: str) -> bool:
        """Whether the library holds a newer version of loaded persona `name` than the one loaded."""
        if self.library is None:
            return False
        try:
            return self.library.get(name).manifest != self.session.adapters[name].manifest
        except (TailorError, KeyError):
            return False  # gone from the library: its request fails at loading, with the reason

    def _join(self, batch: RunningBatch, generation: Generation) -> None:
        """Prefill a request into the batch and hand out its first token; only this request fails if that fails."""
        if self._skip_cancelled(generation):
            return
        try:
            if generation.request.model != BASE:
                self._ensure_loaded(generation.request.model)
            row = Row(generation, list(generation.prompt_ids), generation.request.model,
                      RowSampler(generation.request.settings, self.session.device))
            running = bool(batch)
            batch.join(row)
            generation.joined_running = running
            self.counts["joined_running"] += generation.joined_running
            self.largest_batch = max(self.largest_batch, len(batch))
            self._take_token(generation, row.tokens[-1])
        except Exception as exc:  # one bad request must not end the server; its client hears why
            self._fail([generation], exc)

    def _step(self, batch: RunningBatch) -> None:
        try:
            if self.on_step is not None:
                self.on_step([row.owner for row in batch.rows])
            batch.step()
            self.decode_steps += 1
            self.decoded_rows += len(batch)
            for row in batch.rows:
                self._take_token(row.owner, row.tokens[-1])
        except Exception as exc:  # the server keeps serving; these clients hear why
            self._fail([row.owner for row in batch.rows], exc)
        self._drop_ended(batch)

    def _drop_ended(self, batch: RunningBatch) -> None:
        """Rows whose request has ended or been cancelled leave the batch now."""
        for row in batch.rows:
            self._skip_cancelled(row.owner)
        batch.leave([row for row in batch.rows if row.owner.done])

    def _fail(self, generations: list[Generation], exc: Exception) -> None:
        log.error("Generation failed for requests %s", [generation.id for generation in generations], exc_info=exc)
        message = exc.message if isinstance(exc, TailorError) else "Generation failed; the server log says why."
        for generation in generations:
            if not generation.done:
                generation.finish_reason = "error"
                self.counts["failed"] += 1
                generation.listener(Failed(message, exc.status if isinstance(exc, ServeError) else 500))

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


def _created(entry: AdapterEntry) -> int:
    try:
        return int(entry.path.stat().st_mtime)
    except OSError:
        return int(time.time())
