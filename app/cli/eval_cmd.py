"""`tailor eval NAME`: the persona's report card (base vs persona on held-out prompts, loss, style, loops,
knowledge), printed and kept in the adapter's manifest."""

from __future__ import annotations

import json


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("eval", parents=[common], help="score a persona against its base: the report card")
    parser.add_argument("name", metavar="NAME", help="adapter name from the library")
    parser.add_argument("--prompts", metavar="FILE",
                        help="questions to ask: a chat dataset, or a text file with one question per line "
                             "(default: the persona's held-out examples)")
    parser.add_argument("--json", action="store_true", help="print the card as JSON")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from app.cli.chat_cmd import open_session
    from app.cli.common import errors, open_library
    from app.core.evaluation import evaluate_adapter, plan_card, save_report_card

    library = open_library(args)
    entry = library.get_usable(args.name)
    plan = plan_card(library, entry, args.prompts)  # a bad prompts file fails here, before the model loads
    session, _ = open_session(library, [entry.name], None, None)
    card = evaluate_adapter(session, entry, plan, progress=lambda message: errors.print(f"[dim]{message}[/]"))
    save_report_card(library, entry.name, card)
    # Plain print: stdout carries only the card, unwrapped, for scripts and pipes.
    print(json.dumps(card.to_dict(), indent=2, ensure_ascii=False) if args.json else card.to_text())
    return 0
