"""WhatsApp's "Export chat → Without media" .txt file.

Each message starts with a date and time, then the sender, then the text; a message's further lines follow on their
own. The two common layouts (the date order and the clock follow the phone's locale):

    Android   12/31/23, 9:41 PM - Alice: text        31/12/2023, 21:41 - Alice: text        31.12.23, 21:41 - Alice: text
    iOS       [31/12/2023, 21:41:05] Alice: text     [12/31/23, 9:41:05 PM] Alice: text

Lines with a date but no "Name:" are WhatsApp's own notices (encryption, joins, leaves, group changes) and are
dropped. The date order (day or month first, or year first) is worked out from the whole file: any first field
above 12 means day first, any second field above 12 means month first.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from app.core.converters import ChatMessage, ConversionReport, ExportError, drop_reason, read_text

_HEADER = re.compile(
    r"^[\u200e\u200f]?\[?(?P<date>\d{1,4}[./-]\d{1,2}[./-]\d{1,4})\.?,?\s+"
    r"(?P<time>\d{1,2}[:.]\d{2}(?:[:.]\d{2})?)(?:[\s\u202f\u00a0]*(?P<ampm>[AaPp]\.?\s?[Mm]\.?))?"
    r"(?:\]\s*|\s+[-–]\s+)(?P<rest>.*)$")
_LOOKS_DATED = re.compile(r"^[\u200e\u200f]?\[?\d{1,4}[./-]\d{1,2}[./-]")
_SENDER = re.compile(r"^[\u200e\u200f]?(?P<name>[^:]{1,80}?):\s(?P<text>.*)$", re.DOTALL)
EXPECTED = ("lines like '12/31/23, 9:41 PM - Name: message' (Android) or '[31/12/2023, 21:41:05] Name: message' (iOS)")


def looks_like_whatsapp(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return any(_HEADER.match(line) for _, line in zip(range(20), handle))


def _date_order(dates: list[tuple[str, str, str]], has_brackets: bool, has_ampm: bool) -> str:
    """'dmy', 'mdy' or 'ymd' for the whole file (a chat is exported in one locale)."""
    if any(len(first) == 4 for first, _, _ in dates):
        return "ymd"
    if any(int(first) > 12 for first, _, _ in dates):
        return "dmy"
    if any(int(second) > 12 for _, second, _ in dates):
        return "mdy"
    return "mdy" if has_ampm and not has_brackets else "dmy"


def _timestamp(date: tuple[str, str, str], time: str, ampm: str | None, order: str) -> datetime:
    parts = dict(zip(order, (int(part) for part in date)))
    year = parts["y"] + 2000 if parts["y"] < 100 else parts["y"]
    pieces = [int(piece) for piece in re.split(r"[:.]", time)]
    hour, minute, second = pieces[0], pieces[1], pieces[2] if len(pieces) > 2 else 0
    if ampm:
        afternoon = ampm.lower().startswith("p")
        hour = hour % 12 + (12 if afternoon else 0)
    return datetime(year, parts["m"], parts["d"], hour, minute, second)


def read_messages(path: Path, report: ConversionReport) -> list[ChatMessage]:
    lines = read_text(path)
    headers = [(number, _HEADER.match(line)) for number, line in enumerate(lines, start=1)]
    dated = [(number, match) for number, match in headers if match]
    if not dated:
        first = next((number for number, line in enumerate(lines, start=1) if line.strip()), 1)
        raise ExportError(f"{path.name} line {first}: this does not look like a WhatsApp chat export "
                          f"(expected {EXPECTED}); the line reads: {lines[first - 1][:80]!r}.",
                          hint="In WhatsApp use Export chat → Without media and pick the .txt it makes. A chat in "
                               "another layout can be converted with --from transcript (one 'Name: message' a line).")
    dates = [tuple(re.split(r"[./-]", match["date"])) for _, match in dated]
    order = _date_order(dates, lines[dated[0][0] - 1].lstrip("\u200e").startswith("["),
                        any(match["ampm"] for _, match in dated))
    if order in ("dmy", "mdy") and not any(int(d[0]) > 12 or int(d[1]) > 12 for d in dates):
        report.notes.append(f"No day in this file is past the 12th, so the dates were read "
                            f"{'month first (US)' if order == 'mdy' else 'day first'}; only where a conversation "
                            f"breaks could differ.")

    messages: list[ChatMessage] = []
    current: dict | None = None
    for (number, match), line in zip(headers, lines):
        if match is None:
            if number < dated[0][0]:
                if line.strip():  # text before the first dated line: not a chat this reader understands
                    raise ExportError(f"{path.name} line {number}: expected a dated first line ({EXPECTED}).",
                                      hint="Export the chat again from WhatsApp without editing the file.")
                continue
            if _LOOKS_DATED.match(line) and number == len(lines):
                report.notes.append(f"{path.name} line {number} looks cut off (a date without a message); it was "
                                    f"dropped. Export the chat again if the end of the chat matters.")
                continue
            if current is not None:  # else the next line of a system notice
                current["text"].append(line)
            continue
        if current is not None:
            messages.append(_finish(current))
        try:
            when = _timestamp(tuple(re.split(r"[./-]", match["date"])), match["time"], match["ampm"], order)
        except ValueError as exc:
            raise ExportError(f"{path.name} line {number}: the date '{match['date']}' does not read as "
                              f"{'/'.join(order)} ({exc}).",
                              hint="The file mixes date layouts; export the chat again in one go.") from exc
        sender = _SENDER.match(match["rest"])
        if sender is None or _is_ios_notice(sender["text"]):
            report.dropped["system line"] += 1  # encryption notice, joins, leaves, subject changes…
            current = None
            continue
        current = {"speaker": sender["name"].strip(), "text": [sender["text"]], "time": when, "where": f"line {number}"}
    if current is not None:
        messages.append(_finish(current))
    return messages


def _is_ios_notice(text: str) -> bool:
    """iOS writes its notices under the chat's name, marked with a left-to-right mark ('‎Alice joined…'); the same
    mark also starts '‎image omitted' and '‎<attached: …>', which are media and counted as such later."""
    return text.startswith("\u200e") and drop_reason(text) != "media only"


def _finish(current: dict) -> ChatMessage:
    return ChatMessage(current["speaker"], "\n".join(current["text"]), current["time"], current["where"])
