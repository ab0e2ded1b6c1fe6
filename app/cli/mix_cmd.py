"""`tailor combine A:0.7 B:0.3 --name MIX`: mix persona adapters into a new adapter in the library."""

from __future__ import annotations

from app.core.mixing import DENSITY_METHODS, METHOD_HELP, METHODS


def register(subparsers, common) -> None:
    methods = "; ".join(f"{method}: {help_text}" for method, help_text in METHOD_HELP.items())
    parser = subparsers.add_parser(
        "combine", parents=[common], help="mix adapters with weights into a new adapter",
        description=f"Mix persona adapters with peft's add_weighted_adapter. Methods — {methods}.")
    parser.add_argument("terms", nargs="+", metavar="NAME:WEIGHT", help="adapters and their weights, e.g. pirate:0.7 poet:0.3")
    parser.add_argument("--name", required=True, help="name of the new adapter")
    parser.add_argument("--method", choices=METHODS, default="linear", help="how to combine them (default: linear)")
    parser.add_argument("--density", type=float, default=0.5,
                        help=f"share of each adapter's changes kept by {', '.join(DENSITY_METHODS)} (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed for DARE's random drops")
    parser.add_argument("--base", help="base model (default: the one the adapters were made on)")
    parser.add_argument("--quant", choices=("4bit", "8bit", "none"), help="how to load the base (default: as trained)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from app.cli.chat_cmd import open_session
    from app.cli.common import console, open_library
    from app.core.config import validate_adapter_name
    from app.core.errors import AdapterError
    from app.core.mixing import MixSpec, mix_problem, parse_terms, save_mix

    library = open_library(args)
    spec = MixSpec(parse_terms(args.terms), args.method, args.density, args.seed)
    name = validate_adapter_name(args.name)
    if library.exists(name):
        raise AdapterError(f"An adapter named '{name}' already exists.", "Pick another --name or delete the old one first.")
    # Refuse before loading any model: the reason is in the adapters' configs.
    problem = mix_problem(spec, [library.get_usable(parent) for parent in spec.names])
    if problem:
        raise AdapterError(f"Cannot mix these adapters: {problem}.")
    session, _ = open_session(library, spec.names, args.base, args.quant)
    session.add_mix(name, spec)
    entry = save_mix(session, library, name)
    console.print(f"Saved mix '{entry.name}' ({spec.describe()}, rank {entry.rank}) in {entry.path}")
    console.print(f"Try it: tailor chat --adapter '{entry.name}'")
    return 0
