"""`tailor adapters list|show|add|rename|delete|empty-trash|set-sampling`: manage the library."""

from __future__ import annotations

import json

from rich.table import Table

from app.core.library import human_size


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("adapters", parents=[common], help="list and manage the adapter library")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    actions.add_parser("list", parents=[common], help="list adapters").set_defaults(handler=list_adapters)
    show = actions.add_parser("show", parents=[common], help="show an adapter's manifest")
    show.add_argument("name")
    show.set_defaults(handler=show_adapter)
    add = actions.add_parser("add", parents=[common], help="copy a PEFT LoRA folder made by another tool into the library")
    add.add_argument("folder", help="folder with adapter_config.json and adapter_model.safetensors")
    add.add_argument("--name", help="name in the library (default: the folder's name)")
    add.set_defaults(handler=add_adapter)
    rename = actions.add_parser("rename", parents=[common], help="rename an adapter")
    rename.add_argument("old")
    rename.add_argument("new")
    rename.set_defaults(handler=rename_adapter)
    delete = actions.add_parser("delete", parents=[common], help="move an adapter to the trash")
    delete.add_argument("name")
    delete.set_defaults(handler=delete_adapter)
    actions.add_parser("empty-trash", parents=[common], help="permanently remove trashed adapters").set_defaults(handler=empty_trash)
    sampling = actions.add_parser("set-sampling", parents=[common],
                                  help="save the chat settings a persona recommends (chat, serve and exports use them)")
    sampling.add_argument("name")
    from app.cli.chat_cmd import add_sampling_options

    add_sampling_options(sampling, "(default: leave as it is)")
    sampling.add_argument("--clear", action="store_true", help="remove the persona's settings: Tailor's defaults apply")
    sampling.set_defaults(handler=set_sampling)


def list_adapters(args) -> int:
    from app.cli.common import console, open_library

    library = open_library(args)
    entries = library.entries()
    if not entries:
        console.print(f"No adapters yet in {library.root}. Train one with: tailor train --data FILE")
        return 0
    table = Table(title=f"Adapters in {library.root}")
    for column in ("name", "kind", "base model", "rank", "size", "created", "final loss", "rows", "status"):
        table.add_column(column)
    for entry in entries:
        table.add_row(entry.name, entry.kind, entry.base_model_id or "?", str(entry.rank or "?"),
                      human_size(entry.size_bytes), entry.created or "?",
                      f"{entry.final_loss:.3f}" if entry.final_loss is not None else "-",
                      str(entry.dataset_rows or "-"),
                      "ok" if entry.ok else f"[red]damaged: {entry.problem}[/]")
    console.print(table)
    for name in library.interrupted_runs():
        console.print(f"[yellow]Interrupted run:[/] {name} (continue with tailor train --name '{name}' --data … --resume)")
    return 0


def show_adapter(args) -> int:
    from app.cli.common import console, open_library

    entry = open_library(args).get(args.name)
    console.print(f"[bold]{entry.name}[/]  {entry.path}  ({human_size(entry.size_bytes)})")
    if entry.problem:
        console.print(f"[red]Damaged: {entry.problem}[/]")
    console.print_json(json.dumps(entry.manifest or {"note": "no Tailor manifest (adapter made elsewhere)"}))
    if not entry.problem:
        console.print(f"Recommended chat settings: {describe_sampling(entry)}", highlight=False, soft_wrap=True)
    if not entry.problem:
        from app.cli.share_cmd import print_vllm_readiness

        print_vllm_readiness(entry, entry.path)  # the library folder is itself a PEFT folder vLLM can load
    return 0


def add_adapter(args) -> int:
    from pathlib import Path

    from app.cli.common import console, open_library
    from app.core.library import add_peft_folder

    folder = Path(args.folder).expanduser()
    entry = add_peft_folder(open_library(args), folder, args.name or folder.resolve().name)
    console.print(f"Added '{entry.name}' ({human_size(entry.size_bytes)}, rank {entry.rank}) to the library: {entry.path}")
    return 0


def rename_adapter(args) -> int:
    from app.cli.common import console, open_library

    entry = open_library(args).rename(args.old, args.new)
    console.print(f"Renamed '{args.old}' to '{entry.name}'.")
    return 0


def delete_adapter(args) -> int:
    from app.cli.common import console, open_library

    where = open_library(args).delete(args.name)
    console.print(f"Moved '{args.name}' to the trash ({where}). 'tailor adapters empty-trash' removes it for good.")
    return 0


def empty_trash(args) -> int:
    from app.cli.common import console, open_library

    console.print(f"Removed {open_library(args).empty_trash()} item(s) from the trash.")
    return 0


def describe_sampling(entry) -> str:
    from app.core.chat import GenerationSettings

    if entry.sampling is None:
        return "none saved, so Tailor's defaults (tailor adapters set-sampling saves some)"
    settings = GenerationSettings().with_sampling(entry.sampling).sampling()
    return ", ".join(f"{key.replace('_', ' ')} {settings[key]:g}" + ("" if key in entry.sampling else " (default)")
                     for key in settings)


def set_sampling(args) -> int:
    from app.cli.chat_cmd import SAMPLING_FLAGS
    from app.cli.common import console, open_library
    from app.core.chat import recommend_sampling
    from app.core.errors import TailorError

    given = {field: getattr(args, flag) for flag, field in SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
    if args.clear == bool(given):
        raise TailorError("Give the settings to save (--temperature, --top-p, --top-k, --repetition-penalty) "
                          "or --clear, not both." if given else "Nothing to save: no setting was given.",
                          f"For example: tailor adapters set-sampling {args.name} --temperature 0.5 --top-k 20")
    entry = recommend_sampling(open_library(args), args.name, None if args.clear else given)
    console.print(f"'{entry.name}' now recommends: {describe_sampling(entry)}.", highlight=False, soft_wrap=True)
    return 0
