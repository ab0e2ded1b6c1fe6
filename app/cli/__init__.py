"""The `tailor` command line: the same core the desktop app uses, one module per command group.

Exit codes are a contract: 0 ok, 2 bad input (message on stderr, no traceback), 1 unexpected error (traceback only
with --debug).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from app import __version__
from app.core.errors import TailorError
from app.core.precision import is_out_of_memory

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT = 0, 1, 2

# Each module exposes `register(subparsers)`, which adds its parser(s) with `set_defaults(handler=...)`; a handler
# takes the parsed args and returns an exit code.
COMMAND_MODULES = (
    "app.cli.train_cmd",
    "app.cli.chat_cmd",
    "app.cli.adapters_cmd",
    "app.cli.data_cmd",
    "app.cli.doctor_cmd",
    "app.cli.estimate_cmd",
    "app.cli.demo_cmd",
    "app.cli.mix_cmd",
    "app.cli.share_cmd",
    "app.cli.serve_cmd",
    "app.cli.eval_cmd",
)


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad flags already; keep its message but make sure it names the fix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"tailor: error: {message}\nRun '{self.prog} --help' for the options.\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--library", metavar="DIR", default=argparse.SUPPRESS,
                        help="adapter library folder (default: $TAILOR_HOME or your user data folder)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks for unexpected errors")

    parser = _Parser(prog="tailor", description="Fine-tune persona adapters on your own PC.", parents=[common])
    parser.add_argument("--version", action="version", version=f"tailor {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.library = getattr(args, "library", None)
    args.debug = getattr(args, "debug", False)
    try:
        return int(args.handler(args) or EXIT_OK)
    except TailorError as exc:
        print(f"tailor: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("tailor: interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: never a bare traceback unless asked for
        if is_out_of_memory(exc):
            print(f"tailor: out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n"
                  "Use less memory: a shorter --max-len, a smaller --batch-size or --rank, --quant 4bit, or close "
                  "other programs using the GPU.", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.debug or os.environ.get("TAILOR_DEBUG"):
            traceback.print_exc()
        else:
            print(f"tailor: unexpected error: {type(exc).__name__}: {exc}\n"
                  "Run again with --debug for the full traceback, and please report it.", file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
