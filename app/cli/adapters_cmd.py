"""`tailor adapters list|show|add|rename|delete|empty-trash`: manage the library."""

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
