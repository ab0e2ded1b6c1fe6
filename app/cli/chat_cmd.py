"""`tailor chat`: talk to a persona (or the bare base) from the terminal."""

from __future__ import annotations

from app.core.chat import BASE, ChatSession, GenerationSettings
from app.core.library import AdapterEntry, Library


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("chat", parents=[common], help="chat with a persona adapter (or 'base')")
    parser.add_argument("--adapter", required=True, help="adapter name from the library, or 'base' for none")
    parser.add_argument("--prompt", help="send one message, print the reply and exit")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, help="sample with this temperature (default: greedy)")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, help="fix the sampling for repeatable replies")
    parser.add_argument("--system", help="override the persona's system prompt")
    parser.add_argument("--base", help="base model (default: the one the adapter was trained on, or the bundled one)")
    parser.add_argument("--quant", choices=("4bit", "8bit", "none"), help="how to load the base (default: as trained)")
    parser.set_defaults(handler=run)


def base_and_quant_for(entries: list[AdapterEntry], base: str | None, quant: str | None) -> tuple[str, str]:
    """The base an adapter was trained on (as the user named it then) and the precision it was trained in."""
    trained_with = next(((e.manifest or {}).get("config", {}).get("model", {}) for e in entries if e.manifest), {})
    return base or trained_with.get("base", "default"), quant or trained_with.get("quant", "4bit")


def open_session(library: Library, names: list[str], base: str | None, quant: str | None) -> tuple[ChatSession, list[AdapterEntry]]:
    from app.cli.common import console

    entries = [library.get_usable(name) for name in names if name != BASE]
    base, quant = base_and_quant_for(entries, base, quant)
    session = ChatSession(base, quant, progress=lambda message: console.print(f"[dim]{message}[/]"))
    for entry in entries:
        session.load_adapter(entry)
    return session, entries


def settings_from(args) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature or 0.0,
                              top_p=args.top_p, seed=args.seed)


def run(args) -> int:
    from app.cli.common import console, open_library

    session, entries = open_session(open_library(args), [args.adapter], args.base, args.quant)
    system_prompt = args.system if args.system is not None else (entries[0].system_prompt if entries else None)
    settings = settings_from(args)
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
        console.print(f"[bold magenta]{args.adapter}>[/] ", end="")
        pieces = []
        for piece in session.stream(session.prompt_messages(history, system_prompt), args.adapter if entries else BASE, settings):
            pieces.append(piece)
            console.print(piece, end="", markup=False, highlight=False)
        console.print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
