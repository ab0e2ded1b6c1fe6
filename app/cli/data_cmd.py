"""`tailor data check FILE`: validate a dataset and show what training would see."""

from __future__ import annotations

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


def run_check(args) -> int:
    from app.cli.common import console
    from app.core.data import build_report, load_dataset_file, tokenize_dataset
    from app.core.models import load_tokenizer, resolve_base

    # Validate the file before anything slow, so a broken dataset is reported at once.
    loaded = load_dataset_file(args.file, args.format, args.prompt_column, args.response_column)
    tokenizer = load_tokenizer(resolve_base(args.base, progress=lambda m: console.print(f"[dim]{m}[/]")).folder)
    examples, lengths = tokenize_dataset(tokenizer, loaded, args.max_len, args.system)
    report = build_report(loaded, lengths, len(examples), args.max_len)
    console.print(report.to_text(), markup=False, highlight=False)
    return 0
