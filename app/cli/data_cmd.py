"""`tailor data check FILE`: validate a dataset and show what training would see.
`tailor data convert FILE --from SOURCE --persona NAME`: make a persona dataset from a chat export or a script."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.core.config import DATA_FORMATS


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("data", parents=[common], help="inspect datasets")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    check = actions.add_parser("check", parents=[common], help="validate a dataset and print a report")
    check.add_argument("file")
    check.add_argument("--base", default="default", help="whose tokenizer and chat template to use")
    check.add_argument("--max-len", type=int, default=512)
    check.add_argument("--format", choices=DATA_FORMATS, default="auto")
    check.add_argument("--system", help="persona system prompt added to each example")
    check.add_argument("--prompt-column")
    check.add_argument("--response-column")
    check.set_defaults(handler=run_check)

    from app.core.converters import DEFAULT_GAP_HOURS, SOURCES

    convert = actions.add_parser(
        "convert", parents=[common], help="make a chat JSONL dataset from a chat export, transcript or script",
        description="Turn a WhatsApp .txt export, a Telegram Desktop result.json, a DiscordChatExporter JSON or a "
                    "'Name: message' transcript/script into chat JSONL: one example per conversation, the persona's "
                    "messages as the assistant turns.")
    convert.add_argument("file")
    convert.add_argument("--from", dest="source", required=True, choices=SOURCES, help="what kind of export FILE is")
    convert.add_argument("--persona", required=True, help="the participant whose replies the adapter learns")
    convert.add_argument("--out", help="where to write the chat JSONL (default: FILE's name + the persona, beside it)")
    convert.add_argument("--gap-hours", type=float, default=DEFAULT_GAP_HOURS,
                         help=f"a silence this long starts a new conversation (default {DEFAULT_GAP_HOURS:g})")
    convert.add_argument("--anonymise", action=argparse.BooleanOptionalAction, default=True,
                         help="replace the other participants' names and phone numbers with placeholders (default on)")
    convert.set_defaults(handler=run_convert)


def run_check(args) -> int:
    from app.cli.common import console
    from app.core.data import build_report, load_dataset_file, measure_dataset
    from app.core.models import load_tokenizer, resolve_base

    # Validate the file before anything slow, so a broken dataset is reported at once.
    loaded = load_dataset_file(args.file, args.format, args.prompt_column, args.response_column)
    tokenizer = load_tokenizer(resolve_base(args.base, progress=lambda m: console.print(f"[dim]{m}[/]")).folder)
    usable, lengths = measure_dataset(tokenizer, loaded, args.max_len, args.system)
    report = build_report(loaded, lengths, usable, args.max_len)
    console.print(report.to_text(), markup=False, highlight=False)
    return 0


def default_output(source_file: Path, persona: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in persona).strip("-") or "persona"
    return source_file.with_name(f"{source_file.stem}.{safe}.jsonl")


def run_convert(args) -> int:
    from app.cli.common import console
    from app.core.converters import ExportError, convert_export
    from app.core.dataset_edit import save_chat_jsonl, too_few_warning

    source_file = Path(args.file).expanduser()
    out = Path(args.out).expanduser() if args.out else default_output(source_file, args.persona)
    if out.resolve() == source_file.resolve():
        raise ExportError(f"--out {out} is the export itself; converting would overwrite it.",
                          hint="Choose another file name for the dataset.")
    conversion = convert_export(source_file, args.source, args.persona, args.gap_hours, args.anonymise)
    save_chat_jsonl(out, (example["messages"] for example in conversion.examples))
    console.print(conversion.report.to_text(), markup=False, highlight=False)
    console.print(f"Wrote {len(conversion.examples):,} example(s) to {out}", markup=False, highlight=False)
    warning = too_few_warning(len(conversion.examples))
    if warning:
        console.print(f"Warning: {warning}", markup=False, highlight=False)
    console.print(f"Check it with: tailor data check {out}", markup=False, highlight=False)
    return 0
