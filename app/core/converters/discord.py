"""DiscordChatExporter's JSON export (one channel or DM per file).

{"guild": {...}, "channel": {...}, "messages": [{"id", "type": "Default" | "Reply" | "GuildMemberJoin" | …,
"timestamp": "2023-12-31T21:41:05.123+00:00", "content": "…", "author": {"name", "nickname", "isBot", …},
"attachments": [...], "stickers": [...], "embeds": [...]}], "messageCount": N}

Only "Default" and "Reply" messages are things someone wrote; joins, pins, calls, thread notices are system lines.
A speaker is known by their server nickname (what people saw), falling back to the account name; the persona may be
given as either.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from app.core.converters import ChatMessage, ConversionReport, ExportError, load_json

WRITTEN = {"Default", "Reply"}


def read_messages(path: Path, report: ConversionReport) -> list[ChatMessage]:
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ExportError(f"{path.name}: this is JSON but not a DiscordChatExporter export (no 'messages' list).",
                          hint="Export the channel with DiscordChatExporter in the JSON format.")
    messages: list[ChatMessage] = []
    aliases: dict[str, str] = {}
    for position, entry in enumerate(data["messages"], start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("author"), dict):
            raise ExportError(f"{path.name}: message {position} has no author.",
                              hint="Export the channel again; the file was changed or damaged.")
        where = f"message {position} (id {entry.get('id', '?')})"
        if entry.get("type", "Default") not in WRITTEN:
            report.dropped["system line"] += 1
            continue
        author = entry["author"]
        name = str(author.get("name") or "unknown")
        speaker = str(author.get("nickname") or name)
        aliases.setdefault(name, speaker)
        try:
            when = datetime.fromisoformat(entry["timestamp"]) if entry.get("timestamp") else None
        except (TypeError, ValueError) as exc:
            raise ExportError(f"{path.name}: {where} has an unreadable timestamp {entry.get('timestamp')!r}.",
                              hint="Export the channel again; the file was changed or damaged.") from exc
        text = str(entry.get("content") or "")
        if not text.strip() and (entry.get("attachments") or entry.get("stickers") or entry.get("embeds")):
            report.dropped["media only"] += 1
            continue
        messages.append(ChatMessage(speaker, text, when, where))
    report.aliases.update({name: speaker for name, speaker in aliases.items() if name != speaker})
    return messages
