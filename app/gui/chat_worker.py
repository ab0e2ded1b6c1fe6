"""The chat's torch side: one ChatSession living on its own QThread, driven by queued signals from the chat pane.

The worker is long-lived (unlike a training Job): it keeps the loaded base and every opened persona between
messages. Requests queue in its thread's event loop and run one at a time, which is also what the single model
needs. Stopping cannot be a queued call (the thread is busy generating), so the pane sets a request-id watermark
directly: every request at or below it stops at the next token, or is skipped if it has not started.

The worker remembers what the user opened (base, personas, mixes) apart from the session itself, so it can drop the
model to free memory while training runs and rebuild the same state on the next message. The session itself comes
from app.gui.shared_session: when "Serve to other apps" already holds the same base, the chat uses that one.
"""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QObject, Signal, Slot

from app.core.chat import ChatSession, GenerationSettings, base_for
from app.core.errors import TailorError
from app.core.library import BaseProfile, Library
from app.core.mixing import MixSpec, save_mix
from app.gui.shared_session import shared_sessions
from app.gui.workers import OUT_OF_MEMORY, describe_failure

AUTO_BASE = "auto"


@dataclass(frozen=True)
class ReplyRequest:
    request_id: int
    choice: str
    """BASE, an opened persona or a previewed mix."""
    messages: list[dict[str, str]]
    """The whole prompt: system prompt (if any), then the conversation so far."""
    settings: GenerationSettings


def user_message(exc: BaseException) -> str:
    """What went wrong, in words for the chat pane; the traceback of a real bug goes to the log only."""
    failure = describe_failure(exc)
    if failure.kind == OUT_OF_MEMORY:
        return "Not enough memory to run the chat. Close other programs, pick 4-bit, or a smaller base model."
    return failure.message + (f" {failure.hint}" if failure.hint else "")


class _RequestStopped:
    """The stop flag ChatSession.stream polls between tokens, scoped to one request."""

    def __init__(self, worker: ChatWorker, request_id: int):
        self._worker, self._request_id = worker, request_id

    def is_set(self) -> bool:
        return self._request_id <= self._worker.cancelled_through


class ChatWorker(QObject):
    status = Signal(str)
    base_ready = Signal(object)
    """BaseProfile of the base model just loaded."""
    persona_opened = Signal(str)
    persona_failed = Signal(str, str)
    """(name, why it cannot be used)."""
    mix_ready = Signal(str, object)
    """(mix name, its system prompt: its heaviest parent's)."""
    mix_saved = Signal(str)
    mix_failed = Signal(str, str)
    """(mix name, why)."""
    precision_chosen = Signal(str)
    """How the base is held in memory and why ('full precision (fp32): chosen automatically, it fits …')."""
    reply_trimmed = Signal(int, str)
    """(request id, the note saying which older messages the model could not read along with this one)."""
    reply_piece = Signal(int, str)
    reply_done = Signal(int, str, bool)
    """(request id, the whole reply, whether it was stopped early)."""
    reply_failed = Signal(int, str)

    def __init__(self, library: Library):
        super().__init__()
        self.library = library
        self._sessions = shared_sessions()
        self.cancelled_through = 0
        """Requests with an id up to this one are stopped; written by the GUI thread, read between tokens."""
        self.paused_reason: str | None = None
        """While set (training runs), no model is loaded; written by the GUI thread."""
        self._session: ChatSession | None = None
        self._base, self._quant = AUTO_BASE, "auto"
        self._personas: list[str] = []
        self._mixes: dict[str, MixSpec] = {}

    def cancel_through(self, request_id: int) -> None:
        """Stop the running request and skip queued ones up to `request_id`. Safe to call from any thread."""
        self.cancelled_through = max(self.cancelled_through, request_id)

    @Slot(str, str)
    def configure_base(self, base: str, quant: str) -> None:
        if (base, quant) != (self._base, self._quant):
            self._base, self._quant = base, quant
            self.drop_session()

    @Slot(str)
    def open_persona(self, name: str) -> None:
        """Load the persona now (so a misfit shows at once), or remember it for when the model loads again."""
        if name not in self._personas:
            self._personas.append(name)
        if self.paused_reason:
            return
        try:
            if self._session is None:
                self._ensure_session()  # loads every remembered persona, this one included
            elif name not in self._session.adapters:
                self._load_persona(name)
        except Exception as exc:
            self.persona_failed.emit(name, user_message(exc))

    @Slot(object)
    def generate(self, request: ReplyRequest) -> None:
        stopped = _RequestStopped(self, request.request_id)
        if stopped.is_set():
            self.reply_done.emit(request.request_id, "", True)
            return
        try:
            session = self._ensure_session()
            if request.choice not in session.choices():
                self.reply_failed.emit(request.request_id, f"'{request.choice}' could not be opened on {session.resolved.model_id}.")
                return
            fitted = session.fit_to_context(request.messages, request.settings)
            if fitted.note:
                self.reply_trimmed.emit(request.request_id, fitted.note)
            pieces = []
            for piece in session.stream(fitted.messages, request.choice, request.settings, stop=stopped):
                pieces.append(piece)
                self.reply_piece.emit(request.request_id, piece)
            self.reply_done.emit(request.request_id, "".join(pieces).strip(), stopped.is_set())
        except Exception as exc:  # a failed reply is a message in the pane, never a dead worker thread
            self.reply_failed.emit(request.request_id, user_message(exc))

    @Slot(str, object)
    def preview_mix(self, name: str, spec: MixSpec) -> None:
        try:
            self._build_mix(self._ensure_session(), name, spec)
        except Exception as exc:
            self.mix_failed.emit(name, user_message(exc))

    @Slot(str, object)
    def save_mix(self, name: str, spec: MixSpec) -> None:
        try:
            session = self._ensure_session()
            self._build_mix(session, name, spec)
            save_mix(session, self.library, name)
            del self._mixes[name]
            self._personas.append(name)
            self.mix_saved.emit(name)
        except Exception as exc:
            self.mix_failed.emit(name, user_message(exc))

    @Slot()
    def release(self) -> None:
        """Free the model's memory (training needs it); the next request loads it again with the same personas."""
        if self._session is not None:
            if self.drop_session():
                self.status.emit("The chat model was unloaded so training has the memory; it loads again after "
                                 "training.")
            else:
                self.status.emit("Chat let go of the model, but the server still serves it: training has that much "
                                 "less memory until you turn serving off.")

    def _ensure_session(self) -> ChatSession:
        if self.paused_reason:
            raise TailorError(self.paused_reason)
        if self._session is not None:
            return self._session
        entries = [self.library.get(name) for name in self._personas if self.library.exists(name)]
        base, quant = base_for(entries, None if self._base == AUTO_BASE else self._base, self._quant)
        self._session = self._sessions.open((str(self.library.root), self._base, self._quant),
                                            lambda: ChatSession(base, quant, progress=self.status.emit), self)
        self.base_ready.emit(self._session.profile)
        self.precision_chosen.emit(self._session.precision.describe())
        for name in list(self._personas):
            self._load_persona(name)
        for name, spec in list(self._mixes.items()):
            if self._session.mixes.get(name) == spec:
                continue  # still there: the server held the session while chat let go of it
            try:
                self._session.add_mix(name, spec)
            except Exception as exc:
                del self._mixes[name]
                self.mix_failed.emit(name, user_message(exc))
        self.status.emit(f"{self._session.resolved.model_id} is ready, in {self._session.precision.label}.")
        return self._session

    def _load_persona(self, name: str) -> None:
        try:
            self._session.load_adapter(self.library.get(name))
        except Exception as exc:
            self._personas.remove(name)
            self.persona_failed.emit(name, user_message(exc))
        else:
            self.persona_opened.emit(name)

    def _build_mix(self, session: ChatSession, name: str, spec: MixSpec) -> None:
        if session.mixes.get(name) == spec:
            return
        if name in session.mixes:
            session.close(name)  # the same name with other weights: the user moved a slider since the last preview
        for parent in spec.names:
            self.open_persona(parent)
        session.add_mix(name, spec)
        self._mixes[name] = spec
        self.mix_ready.emit(name, session.system_prompt(name))

    def drop_session(self) -> bool:
        """Let go of the session; whether that freed it (False: the server still holds it). Emits nothing, so the
        pane can call it once the worker's thread has ended."""
        if self._session is None:
            return False
        self._session = None
        return self._sessions.close(self)


class LoadedBase(QObject):
    """Which base the chat has loaded, for panels (the library's fit column) that judge adapters against it."""

    changed = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self.profile: BaseProfile | None = None

    def publish(self, profile: BaseProfile | None) -> None:
        self.profile = profile
        self.changed.emit(profile)


_loaded_base = LoadedBase()


def loaded_base() -> LoadedBase:
    """The one LoadedBase of this process: the chat publishes to it, the library panel listens."""
    return _loaded_base
