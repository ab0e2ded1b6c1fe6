"""Telegram Desktop's "Export chat history" in JSON (result.json).

One chat exports as {"name", "type", "id", "messages": [...]}; "Export Telegram data" of a whole account as
{"chats": {"list": [chat, ...]}}, and then each chat is read in turn, a new chat always starting a new conversation.
A message is {"type": "message", "date": "2023-12-31T21:41:05", "from": "Alice", "text": ...} where text is a plain
string, or a list of plain strings and entities ({"type": "link" | "bold" | "mention" | …, "text": "…"}) when the
message has formatting. Service entries ("type": "service": joins, pins, calls) are dropped; a message whose text is
empty is media only (photo, sticker, voice note, file).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from app.core.converters import ChatMessage, ConversionReport, ExportError, load_json


def message_text(text) -> str:
    """The text as written: entities contribute their own text, whatever their formatting."""
    if isinstance(text, str):
        return text
    if isinstance(text, list):
        return "".join(piece if isinstance(piece, str) else str(piece.get("text", "")) for piece in text
                       if isinstance(piece, (str, dict)))
    return ""


def _chats(data, path: Path) -> list[dict]:
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        return [data]
    if isinstance(data, dict) and isinstance(data.get("chats"), dict) and isinstance(data["chats"].get("list"), list):
        return [chat for chat in data["chats"]["list"] if isinstance(chat, dict) and isinstance(chat.get("messages"), list)]
    raise ExportError(f"{path.name}: this is JSON but not a Telegram export (no 'messages' list, no 'chats').",
                      hint="In Telegram Desktop use ⋮ → Export chat history, format 'Machine-readable JSON', and "
                           "pick the result.json it writes.")


def read_messages(path: Path, report: ConversionReport) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    for chat in _chats(load_json(path), path):
        first_of_chat = True
        for position, entry in enumerate(chat["messages"], start=1):
            where = f"message {entry.get('id', position)}" if isinstance(entry, dict) else f"entry {position}"
            if not isinstance(entry, dict):
                raise ExportError(f"{path.name}: {where} is not an object.",
                                  hint="Export the chat again; the file was changed or damaged.")
            if entry.get("type") != "message":
                report.dropped["system line"] += 1  # service: joins, pins, calls, title changes
                continue
            speaker = entry.get("from") or entry.get("author")
            if not isinstance(speaker, str) or not speaker.strip():
                speaker = "Deleted Account"
            try:
                when = datetime.fromisoformat(entry["date"]) if entry.get("date") else None
            except (TypeError, ValueError) as exc:
                raise ExportError(f"{path.name}: {where} has a date Telegram does not write ({entry.get('date')!r}).",
                                  hint="Export the chat again; the file was changed or damaged.") from exc
            text = message_text(entry.get("text", ""))
            if not text.strip() and any(key in entry for key in ("photo", "file", "media_type", "sticker_emoji", "poll", "location_information")):
                report.dropped["media only"] += 1
                continue
            messages.append(ChatMessage(speaker.strip(), text, when, where, scene_break=first_of_chat))
            first_of_chat = False
    return messages
