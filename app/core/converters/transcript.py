"""A plain-text transcript, script or book dialogue: one "Name: what they said" a line.

    Alice: Are you coming tonight?
    Bob: Only if there is cake.

    HAMLET: To be, or not to be, that is the question.

A line that does not start with a name continues the line before it (a wrapped paragraph); a blank line just
separates. Stage directions in brackets are dropped. A scene heading ("ACT II", "SCENE 3", "INT. KITCHEN - NIGHT",
"CHAPTER 4", a line of *** or ---) starts a new conversation, since transcripts carry no times to split on.

With two speakers this is a conversation, read like a chat export. With more (a play, a novel), each of the persona's
lines becomes its own example, answering the line just before it (`is_script`).
"""

from __future__ import annotations

import re
from pathlib import Path

from app.core.converters import ChatMessage, ConversionReport, ExportError, read_text

_SPEAKER = re.compile(r"^\s*(?P<name>[^\W\d][\w .'’-]{0,40}?)\s*(?:\([^)]*\))?\s*:\s*(?P<text>.*)$")
_DIRECTION = re.compile(r"^\s*[\[(].*[\])]\s*$")
_ASIDE = re.compile(r"^\s*[\[(][^\])]*[\])]\s*")
"""'(aside) A little more than kin…': the direction before a line is not part of what is said."""
_SCENE = re.compile(r"^\s*((act|scene|chapter|part)\b.*|(int|ext)\.\s.*|[*=~-]{3,}|#+\s.*)$", re.IGNORECASE)
TIMESTAMPED = re.compile(r"^\s*\[?\d{1,2}:\d{2}(:\d{2})?\]?\s+")
"""'[00:01:02] Alice: …' subtitles and meeting transcripts: the stamp is dropped."""


def read_messages(path: Path, report: ConversionReport) -> list[ChatMessage]:
    messages: list[dict] = []
    scene_break = False
    for number, raw in enumerate(read_text(path), start=1):
        line = TIMESTAMPED.sub("", raw)
        if not line.strip():
            continue
        if _SCENE.match(line):
            scene_break = True
            continue
        if _DIRECTION.match(line):
            report.dropped["stage direction"] += 1
            continue
        match = _SPEAKER.match(line)
        if match and _plausible_name(match["name"]):
            messages.append({"speaker": match["name"].strip(), "text": [_ASIDE.sub("", match["text"]).strip()],
                             "where": f"line {number}", "scene_break": scene_break})
            scene_break = False
        elif messages:
            messages[-1]["text"].append(line.strip())
        else:
            raise ExportError(f"{path.name} line {number}: expected 'Name: what they said', found {raw.strip()[:80]!r}.",
                              hint="Put each line of dialogue on its own line, starting with the speaker's name and "
                                   "a colon. Text before the first named line (a title, a preface) must be removed.")
    return [ChatMessage(m["speaker"], " ".join(part for part in m["text"] if part), None, m["where"], m["scene_break"])
            for m in messages]


def _plausible_name(name: str) -> bool:
    """'Note: …' or 'https://…' are not speakers; names are short and not sentences."""
    words = name.split()
    return 0 < len(words) <= 4 and not name.lower().startswith(("http", "www"))


def is_script(messages: list[ChatMessage]) -> bool:
    return len({message.speaker for message in messages}) > 2
