"""`tailor serve`: the library's personas on one base model, behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import logging

from app.core.serving import MAX_BATCH


def register(subparsers, common) -> None:
    from app.server.runner import DEFAULT_HOST, DEFAULT_PORT

    parser = subparsers.add_parser(
        "serve", parents=[common], help="serve personas to other apps (OpenAI-compatible API)",
        description="Load the base model once with the library's personas on it and answer OpenAI chat-completions "
                    "requests; the request's 'model' picks the persona ('base' for none).")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}, this computer only; any other needs --api-key)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every API request")
    parser.add_argument("--adapters", default="all", metavar="NAME,...|all",
                        help="personas to serve (default: all, including ones added while the server runs)")
    parser.add_argument("--quant", choices=("4bit", "8bit", "none"), help="how to load the base (default: as trained)")
    parser.add_argument("--base", help="base model (default: the one the personas were made on, or the bundled one)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH,
                        help=f"requests answered together in one batch (default {MAX_BATCH}; 1 = one at a time)")
    parser.set_defaults(handler=run)


def chosen_names(text: str) -> list[str] | None:
    from app.core.errors import TailorError

    if text.strip().lower() == "all":
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise TailorError("--adapters is empty.", "Name the personas to serve, e.g. --adapters pirate,butler, or 'all'.")
    return list(dict.fromkeys(names))


def run(args) -> int:
    from app.cli.common import console, errors, open_library
    from app.core.chat import ChatSession, base_for
    from app.core.errors import TailorError
    from app.core.serving import ServingEngine
    from app.server.app import create_app
    from app.server.runner import bind, check_exposure, url_for, uvicorn_server
    from app.server.snippets import one_line_example

    # Everything a user can get wrong is checked before the model loads (which takes a while).
    check_exposure(args.host, args.api_key)
    if not 0 <= args.port <= 65535:
        raise TailorError(f"--port must be between 0 and 65535, not {args.port}.")
    if args.max_batch < 1:
        raise TailorError(f"--max-batch must be at least 1, not {args.max_batch}.")
    library = open_library(args)
    names = chosen_names(args.adapters)
    entries = [library.get_usable(name) for name in names] if names else [e for e in library.entries() if e.ok]
    sock = bind(args.host, args.port)
    base, quant = base_for(entries, args.base, args.quant)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")

    say = lambda message: errors.print(f"[dim]{message}[/]")  # noqa: E731
    engine = ServingEngine(ChatSession(base, quant, progress=say), library, names, args.max_batch)
    personas = engine.load_available(say)
    engine.start()
    url = url_for(sock)
    served = [persona.name for persona in personas if persona.available]
    console.print(f"Serving [bold]{engine.session.resolved.model_id}[/] ({quant}) as 'base'"
                  + (f" with {len(served)} persona(s): {', '.join(served)}" if served else ", no personas yet"))
    for persona in personas:
        if not persona.available:
            console.print(f"[yellow]Unavailable:[/] {persona.name}: {persona.problem}")
    console.print(f"OpenAI-compatible API at [bold]{url}/v1[/]  (Ctrl-C stops)")
    console.print(f"Try: {one_line_example(url, served[0] if served else 'base', args.api_key)}", soft_wrap=True,
                  markup=False, highlight=False)
    try:
        uvicorn_server(create_app(engine, args.api_key)).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    return 0
