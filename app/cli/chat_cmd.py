"""`tailor chat`: talk to a persona (or the bare base) from the terminal; `tailor compare`: one prompt, several
personas, replies one after another under clear labels."""

from __future__ import annotations

from dataclasses import replace

from app.core.chat import BASE, CHAT_PRECISIONS, ChatSession, GenerationSettings, base_for
from app.core.errors import TailorError
from app.core.library import AdapterEntry, Library

# The flags that override a persona's recommended decoding, by GenerationSettings field.
SAMPLING_FLAGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                  "repetition_penalty": "repetition_penalty"}


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("chat", parents=[common], help="chat with a persona adapter (or 'base')")
    parser.add_argument("--adapter", required=True, help="adapter name from the library, or 'base' for none")
    parser.add_argument("--prompt", help="send one message, print the reply and exit")
    add_generation_options(parser, default_seed=None)
    parser.add_argument("--system", help="override the persona's system prompt")
    add_base_options(parser)
    parser.set_defaults(handler=run)

    compare = subparsers.add_parser("compare", parents=[common], help="send one prompt to several personas and show each reply")
    compare.add_argument("--adapters", required=True, metavar="A,B,…",
                         help="comma-separated choices: adapter names from the library, 'base' for no adapter")
    compare.add_argument("--prompt", required=True, help="the message every choice answers")
    add_generation_options(compare, default_seed=0)
    compare.add_argument("--system", help="one system prompt for all (default: each persona's own)")
    add_base_options(compare)
    compare.set_defaults(handler=run_compare)


def add_generation_options(parser, default_seed: int | None) -> None:
    defaults = GenerationSettings()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    add_sampling_options(parser)
    parser.add_argument("--seed", type=int, default=default_seed, help="fix the sampling for repeatable replies")


def add_sampling_options(parser, default: str | None = None) -> None:
    """The flags of SAMPLING_FLAGS; each is None unless given. `default` says what an absent flag means."""
    defaults = GenerationSettings()

    def otherwise(value) -> str:
        return default or f"(default: the persona's recommended setting, else {value:g})"

    parser.add_argument("--temperature", type=float,
                        help=f"randomness of the reply; 0 is greedy, the same reply every time {otherwise(defaults.temperature)}")
    parser.add_argument("--top-p", type=float,
                        help=f"sample among the likeliest tokens adding up to this probability {otherwise(defaults.top_p)}")
    parser.add_argument("--top-k", type=int,
                        help=f"sample among this many likeliest tokens, 0 for no limit {otherwise(defaults.top_k)}")
    parser.add_argument("--repetition-penalty", type=float,
                        help=f"discourage tokens used in the last {defaults.repetition_window}, 1 for off "
                             f"{otherwise(defaults.repetition_penalty)}")


def add_base_options(parser) -> None:
    parser.add_argument("--base", help="base model (default: the one the adapters were made on, or the bundled one)")
    parser.add_argument("--quant", choices=CHAT_PRECISIONS, default="auto",
                        help="how to hold the base in memory: 'auto' (default) keeps it unquantised when it fits "
                             "comfortably in free memory and uses 4-bit only when it must")


def open_session(library: Library, names: list[str], base: str | None, quant: str | None) -> tuple[ChatSession, list[AdapterEntry]]:
    from app.cli.common import errors

    entries = [library.get_usable(name) for name in names if name != BASE]
    base, quant = base_for(entries, base, quant)
    # Progress goes to stderr so that stdout carries only the replies (scripts pipe them).
    session = ChatSession(base, quant, progress=lambda message: errors.print(f"[dim]{message}[/]"))
    errors.print(f"[dim]Precision: {session.precision.describe()}[/]", highlight=False, soft_wrap=True)
    for entry in entries:
        session.load_adapter(entry)
    return session, entries


def parse_choices(text: str) -> list[str]:
    choices = [BASE if choice.strip().lower() == BASE else choice.strip() for choice in text.split(",") if choice.strip()]
    if not choices:
        raise TailorError("--adapters is empty.", "Name the choices to compare, e.g. --adapters base,pirate,poet")
    duplicates = sorted({choice for choice in choices if choices.count(choice) > 1})
    if duplicates:
        raise TailorError(f"'{duplicates[0]}' is listed twice in --adapters.", "Name each choice once.")
    return choices


def settings_from(args, recommended: dict | None = None) -> GenerationSettings:
    """The defaults, then the persona's recommended decoding (its manifest's "sampling"), then the flags given."""
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=args.seed).with_sampling(recommended)
    given = {field: getattr(args, flag) for flag, field in SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
    return replace(settings, **given)


def run(args) -> int:
    from app.cli.common import console, errors, open_library

    session, entries = open_session(open_library(args), [args.adapter], args.base, args.quant)
    system_prompt = args.system if args.system is not None else (entries[0].system_prompt if entries else None)
    settings = settings_from(args, entries[0].sampling if entries else None)
    errors.print(f"[dim]Decoding: {settings.describe()}[/]", highlight=False, soft_wrap=True)
    if args.prompt is not None:
        messages = session.prompt_messages([{"role": "user", "content": args.prompt}], system_prompt)
        print(session.reply(messages, args.adapter if entries else BASE, settings))
        return 0

    console.print(f"Chatting with [bold]{args.adapter}[/]. Type /clear to start over, /exit or Ctrl-D to leave.")
    history: list[dict[str, str]] = []
    while True:
        try:
            text = console.input("[bold cyan]you>[/] ").strip()
        except EOFError:
            console.print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            history.clear()
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        fitted = session.fit_to_context(session.prompt_messages(history, system_prompt), settings)
        if fitted.note:
            console.print(f"[yellow]({fitted.note})[/]", highlight=False)
        console.print(f"[bold magenta]{args.adapter}>[/] ", end="")
        pieces = []
        for piece in session.stream(fitted.messages, args.adapter if entries else BASE, settings):
            pieces.append(piece)
            console.print(piece, end="", markup=False, highlight=False)
        console.print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


def run_compare(args) -> int:
    from app.cli.common import console, open_library

    choices = parse_choices(args.adapters)
    settings = settings_from(args)
    session, _ = open_session(open_library(args), choices, args.base, args.quant)
    console.print(f"[dim]Same settings for every choice: {settings.describe()}[/]")
    for choice, reply in session.compare(args.prompt, choices, settings, args.system):
        console.rule(f"[bold]{choice}[/]" if choice != BASE else "[bold]base[/] (no adapter)", align="left")
        # Plain print: rich would re-wrap the reply at the console width, changing the model's text.
        print(reply if reply else "(empty reply)", flush=True)
    return 0

