"""One loaded base for the whole window: the chat pane and its "Serve to other apps" server share a ChatSession.

A base model is the largest thing Tailor holds in memory, and the chat and the server would otherwise each load
their own copy of the same one. Here each of them `open`s the session for the library and the (base, quant) the
chat pane has chosen, and gets the one already loaded if there is one. The session stays while anyone holds it:
the chat letting go (training needs the memory, or another base was picked) leaves the server serving, and the
server stopping leaves the chat chatting. ChatSession serialises its own model use (its lock), so both can work at once.

Loading happens under this object's lock, so two holders asking at once wait for one load rather than making two.
Both ask from worker threads, never from the GUI thread.
"""

from __future__ import annotations

import gc
import threading
from typing import Callable

from app.core.chat import ChatSession

Key = tuple[str, str, str]
"""(library folder, base, quant), base and quant as the chat pane names them, before 'auto' is resolved. A session
loads personas by name from one library, so another library (another window, a test) never shares it."""


class SharedSessions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[Key, ChatSession] = {}
        self._holders: dict[Key, set[object]] = {}

    def open(self, key: Key, load: Callable[[], ChatSession], holder: object) -> ChatSession:
        """The session for `key`, loaded by `load` unless someone holds it already; `holder` holds it from now."""
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = load()
                self._holders[key] = set()
            self._holders[key].add(holder)
            return self._sessions[key]

    def close(self, holder: object) -> bool:
        """`holder` lets go of whatever it holds; a session nobody holds any more is freed. Whether one was."""
        with self._lock:
            unheld = []
            for key, holders in self._holders.items():
                holders.discard(holder)
                if not holders:
                    unheld.append(key)
            freed = [self._sessions.pop(key) for key in unheld]
            for key in unheld:
                del self._holders[key]
        if not freed:
            return False
        on_cuda = any(session.device == "cuda" for session in freed)
        del freed
        gc.collect()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()
        return True


_shared_sessions = SharedSessions()


def shared_sessions() -> SharedSessions:
    """The one SharedSessions of this process: the chat worker and the serve panel open their sessions here."""
    return _shared_sessions
