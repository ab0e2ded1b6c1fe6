"""Turn the chat history people already have into persona training data.

Each source module (whatsapp, telegram, discord, transcript) only *reads* its format: it yields `ChatMessage`s in
order, with the line (or message id) they came from, and drops what is not a message (system lines, joins, calls).
Everything after that is shared and lives here: dropping media-only, link-only and deleted messages, splitting the
history into conversations at long silences, merging consecutive messages of one speaker into one turn, replacing the
other participants' names and phone numbers with placeholders, and shaping each conversation into one multi-turn
OpenAI-chat example whose assistant turns are the persona's.

`convert_export` is the one entry point the CLI and the GUI call; it returns the examples and a `ConversionReport`
saying what was kept and what was dropped, and why.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator

from app.core.errors import TailorError

SOURCES = ("whatsapp", "telegram", "discord", "transcript")
DEFAULT_GAP_HOURS = 6.0
LARGE_GROUP = 20
"""With more speakers than this, a conversation is mostly other people talking to each other: only the few
messages just before each of the persona's replies are kept as its context."""
CONTEXT_IN_LARGE_GROUPS = 4
SPEAKERS_LISTED = 15

Messages = list[dict[str, str]]


class ExportError(TailorError):
    """An export file that cannot be converted; the message names the file and, where known, the line."""


@dataclass(frozen=True)
class ChatMessage:
    """One message as the export has it: who wrote it, when (None in transcripts), and where in the file."""

    speaker: str
    text: str
    time: datetime | None
    where: str
    """'line 17' or 'message 4051', for messages that point the user back at the file."""
    scene_break: bool = False
    """True for the first message after a break the source marks itself (a new scene, a new chat)."""


@dataclass
class ConversionReport:
    """What a conversion kept and dropped, in words the CLI prints and the GUI shows."""

    path: str
    source: str
    persona: str
    messages_read: int = 0
    messages_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    """Messages left out, by reason ('media only', 'system line', …)."""
    speakers: Counter = field(default_factory=Counter)
    """Messages per speaker name, as read (before anonymising)."""
    conversations: int = 0
    examples: int = 0
    conversations_without_persona: int = 0
    placeholders: dict[str, str] = field(default_factory=dict)
    """Other participants' names and the placeholder each became (empty when anonymising is off)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Other names a speaker goes by (a Discord account name → the server nickname shown), for finding the persona."""
    notes: list[str] = field(default_factory=list)
    """Things the user should know: an assumed date order, a cut-off last line, a large group trimmed."""

    def to_text(self) -> str:
        lines = [
            f"Converted {Path(self.path).name} ({self.source}) with '{self.persona}' as the persona.",
            f"Messages: {self.messages_read:,} read, {self.messages_kept:,} kept.",
        ]
        if self.dropped:
            lines.append("Dropped: " + ", ".join(f"{count:,} {reason}" for reason, count in self.dropped.most_common()))
        lines.append(f"Conversations: {self.conversations:,}; {self.examples:,} became examples"
                     + (f" ({self.conversations_without_persona:,} had no reply from {self.persona})"
                        if self.conversations_without_persona else "") + ".")
        if self.placeholders:
            shown = ", ".join(f"{name} → {placeholder}" for name, placeholder in list(self.placeholders.items())[:5])
            more = f" and {len(self.placeholders) - 5} more" if len(self.placeholders) > 5 else ""
            lines.append(f"Anonymised: {shown}{more}; phone numbers → [phone].")
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass
class Conversion:
    examples: list[dict]
    """{"messages": [...]} records, ready to write as chat JSONL."""
    report: ConversionReport


# Messages that carry nothing a persona could learn to write, in the languages exports commonly come in.
_MEDIA_ONLY = re.compile(
    r"^\u200e?(<[^<>]{1,80}>"  # <Media omitted>, <Multimedia omitido>, <attached: 0001-PHOTO.jpg>
    r"|(image|video|audio|sticker|gif|document|contact card|imagen|vídeo|foto|bild|vidéo|photo) (omitted|omitida|omitido|weggelassen|absente|omise)"
    r"|[^\s]+\.(jpe?g|png|gif|webp|mp4|opus|ogg|pdf|vcf) \((file attached|archivo adjunto|datei angehängt|fichier joint)\))$",
    re.IGNORECASE)
_DELETED = re.compile(
    r"^\u200e?(this message was deleted|you deleted this message|se eliminó este mensaje|eliminaste este mensaje|"
    r"diese nachricht wurde gelöscht|ce message a été supprimé|null)$", re.IGNORECASE)
_EDITED_MARK = re.compile(r"\s*<(this message was edited|se editó este mensaje\.?|bearbeitet)>\s*$", re.IGNORECASE)
_URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
PHONE = re.compile(r"(?<![\w+])\+?\d[\d\s().-]{6,}\d(?!\w)")
PHONE_PLACEHOLDER = "[phone]"


def drop_reason(text: str) -> str | None:
    """Why a message's text is not worth learning from, or None to keep it."""
    stripped = text.strip()
    if not stripped:
        return "empty"
    if _MEDIA_ONLY.match(stripped):
        return "media only"
    if _DELETED.match(stripped):
        return "deleted"
    if not _URL.sub("", stripped).strip():
        return "links only"
    return None


def clean_text(text: str) -> str:
    """Remove export markup that is not part of what was written (WhatsApp's '<This message was edited>')."""
    return _EDITED_MARK.sub("", text.replace("\u200e", "")).strip()


def find_speaker(speakers: Iterable[str], persona: str) -> str | None:
    """The speaker the persona name refers to: exact first, then ignoring case and spacing."""
    speakers = list(speakers)
    if persona in speakers:
        return persona
    wanted = " ".join(persona.split()).casefold()
    return next((speaker for speaker in speakers if " ".join(speaker.split()).casefold() == wanted), None)


def never_speaks(path: Path, persona: str, speakers: Counter) -> ExportError:
    most = speakers.most_common(SPEAKERS_LISTED)
    listed = ", ".join(f"{name} ({count:,})" for name, count in most)
    more = f" and {len(speakers) - len(most):,} more" if len(speakers) > len(most) else ""
    return ExportError(
        f"{path.name}: '{persona}' never speaks in this export. The names that do speak (messages): {listed}{more}.",
        hint="Pick one of these names as the persona (spelled as listed; case does not matter)." if speakers else
             "The export holds no messages at all: export the chat again, with its messages.")


class Anonymiser:
    """Replaces other participants' names (as speakers and inside messages) and phone numbers with placeholders."""

    def __init__(self, persona: str, enabled: bool):
        self.persona = persona
        self.enabled = enabled
        self.placeholders: dict[str, str] = {}
        self._pattern: re.Pattern | None = None

    def speaker(self, name: str) -> str:
        if not self.enabled or name == self.persona:
            return name
        if name not in self.placeholders:
            self.placeholders[name] = f"Person {len(self.placeholders) + 1}"
            self._pattern = None
        return self.placeholders[name]

    def text(self, text: str) -> str:
        if not self.enabled:
            return text
        if self._pattern is None and self.placeholders:
            # Full names first, then first names of three letters or more ("Alice" for "Alice Smith").
            names = {name: placeholder for name, placeholder in self.placeholders.items() if not PHONE.fullmatch(name)}
            for name, placeholder in list(names.items()):
                first = name.split()[0] if name.split() else name
                if len(first) >= 3 and first not in names and first.casefold() not in self.persona.casefold():
                    names[first] = placeholder
            self._lookup = {name.casefold(): placeholder for name, placeholder in names.items()}
            alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
            self._pattern = re.compile(rf"(?<!\w)@?({alternatives})(?!\w)", re.IGNORECASE) if alternatives else None
        if self._pattern is not None:
            text = self._pattern.sub(lambda match: self._lookup[match.group(1).casefold()], text)
        return PHONE.sub(PHONE_PLACEHOLDER, text)


def split_conversations(messages: list[ChatMessage], gap: timedelta) -> Iterator[list[ChatMessage]]:
    """Consecutive runs of messages with no silence longer than `gap` and no break the source marked."""
    current: list[ChatMessage] = []
    for message in messages:
        previous = current[-1] if current else None
        if previous is not None and (message.scene_break or (
                message.time is not None and previous.time is not None and message.time - previous.time > gap)):
            yield current
            current = []
        current.append(message)
    if current:
        yield current


def merge_turns(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """(speaker, text) turns: consecutive messages of one speaker become one turn, a line each."""
    turns: list[tuple[str, list[str]]] = []
    for message in messages:
        if turns and turns[-1][0] == message.speaker:
            turns[-1][1].append(message.text)
        else:
            turns.append((message.speaker, [message.text]))
    return [(speaker, "\n".join(texts)) for speaker, texts in turns]


def conversation_example(turns: list[tuple[str, str]], persona: str, name_others: bool) -> Messages | None:
    """One chat example: the persona's turns are the assistant's, everyone else's the user's.

    A conversation the persona opened has no prompt for its first turn, and what follows its last reply has no
    answer to learn from: both are cut, so the example runs from the first message someone wrote to the persona to
    the persona's last reply. In a group (`name_others`) each user line says who wrote it, as the persona saw it.
    """
    messages: Messages = []
    for speaker, text in turns:
        if speaker == persona:
            if messages:
                messages.append({"role": "assistant", "content": text})
        elif messages and messages[-1]["role"] == "user":
            messages[-1]["content"] += "\n" + (f"{speaker}: {text}" if name_others else text)
        else:
            messages.append({"role": "user", "content": f"{speaker}: {text}" if name_others else text})
    while messages and messages[-1]["role"] == "user":
        messages.pop()
    return messages or None


def trim_large_group(messages: list[ChatMessage], persona: str, keep: int) -> list[ChatMessage]:
    """Only the persona's messages and the `keep` messages from others just before each of them."""
    kept: list[ChatMessage] = []
    window: list[ChatMessage] = []
    for message in messages:
        if message.speaker == persona:
            kept += window + [message]
            window = []
        else:
            window = (window + [message])[-keep:]
    return kept


def build_examples(messages: list[ChatMessage], report: ConversionReport, persona: str, gap_hours: float,
                   anonymise: bool, pairs_only: bool = False) -> list[dict]:
    """The shared second half of every converter: filter, split, merge, anonymise, shape (see the module doc)."""
    report.messages_read = len(messages)
    report.speakers = Counter(message.speaker for message in messages)
    speaker = find_speaker(report.speakers, persona)
    if speaker is None and find_speaker(report.aliases, persona):
        speaker = report.aliases[find_speaker(report.aliases, persona)]
    if speaker is None:
        raise never_speaks(Path(report.path), persona, report.speakers)
    report.persona = speaker
    usable = []
    pending_break = False  # a break marked on a dropped message still separates what is around it
    for message in messages:
        text = clean_text(message.text)
        reason = drop_reason(text)
        if reason:
            report.dropped[reason] += 1
            pending_break |= message.scene_break
        else:
            usable.append(ChatMessage(message.speaker, text, message.time, message.where,
                                      message.scene_break or pending_break))
            pending_break = False
    report.messages_kept = len(usable)
    if not any(message.speaker == speaker for message in usable):
        raise ExportError(f"{Path(report.path).name}: every message from '{speaker}' was dropped "
                          f"({', '.join(report.dropped)}), so there is nothing left to learn from.",
                          hint="Export the chat again with its text messages, or pick another persona.")

    large = len(report.speakers) > LARGE_GROUP
    if large:
        report.notes.append(
            f"{Path(report.path).name}: {len(report.speakers):,} people write in this chat: each of {speaker}'s replies keeps only the "
            f"{CONTEXT_IN_LARGE_GROUPS} messages before it as context. For whole conversations, export a smaller chat.")
    anonymiser = Anonymiser(speaker, anonymise)
    examples = []
    for conversation in split_conversations(usable, timedelta(hours=gap_hours)):
        report.conversations += 1
        if large:
            conversation = trim_large_group(conversation, speaker, CONTEXT_IN_LARGE_GROUPS)
        turns = [(anonymiser.speaker(name), anonymiser.text(text)) for name, text in merge_turns(conversation)]
        in_group = len({name for name, _ in turns}) > 2
        shaped = pair_examples(turns, speaker) if pairs_only else [conversation_example(turns, speaker, in_group)]
        shaped = [example for example in shaped if example]
        if not shaped:
            report.conversations_without_persona += 1
        examples += [{"messages": example} for example in shaped]
    report.examples = len(examples)
    report.placeholders = dict(anonymiser.placeholders)
    return examples


def pair_examples(turns: list[tuple[str, str]], persona: str) -> list[Messages]:
    """Script or book dialogue: each of the persona's lines answers the line just before it."""
    return [[{"role": "user", "content": before[1]}, {"role": "assistant", "content": line[1]}]
            for before, line in zip(turns, turns[1:]) if line[0] == persona and before[0] != persona]


def read_text(path: Path) -> list[str]:
    """The file's lines, or an ExportError saying why it cannot be read as text."""
    if not path.is_file():
        raise ExportError(f"{path} does not exist or is not a file.", hint="Check the path.")
    raw = path.read_bytes()
    if not raw.strip():
        raise ExportError(f"{path.name} is empty.", hint="Export the chat again; the file has no messages.")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raw = raw.decode("utf-16").encode("utf-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ExportError(f"{path.name} line {line}: not UTF-8 text (byte {exc.start}).",
                          hint="Export the chat again, or save the file as UTF-8 in a text editor.") from exc
    return text.splitlines()


def load_json(path: Path):
    """The parsed JSON, or an ExportError naming the line where it broke (a truncated export, usually)."""
    import json

    lines = read_text(path)
    try:
        return json.loads("\n".join(lines))
    except json.JSONDecodeError as exc:
        cut = exc.pos >= len("\n".join(lines).rstrip()) - 1
        raise ExportError(
            f"{path.name} line {exc.lineno}, column {exc.colno}: "
            + ("the file ends in the middle of the JSON (it was cut off)." if cut else f"not valid JSON ({exc.msg})."),
            hint="Export the chat again and let the export finish; do not edit the file by hand.") from exc


def _reader(source: str) -> Callable[[Path, ConversionReport], list[ChatMessage]]:
    from app.core.converters import discord, telegram, transcript, whatsapp

    return {"whatsapp": whatsapp.read_messages, "telegram": telegram.read_messages, "discord": discord.read_messages,
            "transcript": transcript.read_messages}[source]


def convert_export(path: str | Path, source: str, persona: str, gap_hours: float = DEFAULT_GAP_HOURS,
                   anonymise: bool = True) -> Conversion:
    """Read an export and build the persona's chat examples; raises ExportError naming the file and line."""
    if source not in SOURCES:
        raise ExportError(f"Unknown export source '{source}'.", hint=f"Use one of: {', '.join(SOURCES)}.")
    if gap_hours <= 0:
        raise ExportError(f"The silence that starts a new conversation must be positive, not {gap_hours} hours.")
    if not persona.strip():
        raise ExportError("Name the persona: the participant whose replies the adapter should learn.")
    path = Path(path).expanduser()
    report = ConversionReport(path=str(path), source=source, persona=persona)
    messages = _reader(source)(path, report)
    if source == "transcript":
        from app.core.converters.transcript import is_script

        pairs_only = is_script(messages)
        if pairs_only:
            report.notes.append("More than two characters speak: read as a script, each of the persona's lines "
                                "answering the line before it.")
    else:
        pairs_only = False
    examples = build_examples(messages, report, persona, gap_hours, anonymise, pairs_only)
    if not examples:
        raise ExportError(f"{path.name}: '{report.persona}' never answers anyone here, so no example could be made.",
                          hint="Pick a chat where the persona replies to someone, or a larger --gap-hours.")
    return Conversion(examples, report)


def speakers_in(path: str | Path, source: str) -> Counter:
    """Who speaks in an export and how often, so the GUI can offer the persona names."""
    path = Path(path).expanduser()
    report = ConversionReport(path=str(path), source=source, persona="")
    return Counter(message.speaker for message in _reader(source)(path, report))


def guess_source(path: str | Path) -> str:
    """The most likely source for a file, from its name and first bytes (the user can still override it)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        with open(path, "rb") as handle:
            head = handle.read(4096)
        return "discord" if b'"guild"' in head or b'"channel"' in head else "telegram"
    from app.core.converters.whatsapp import looks_like_whatsapp

    return "whatsapp" if looks_like_whatsapp(path) else "transcript"
