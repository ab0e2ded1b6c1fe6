"""`tailor export` and `tailor import`: share adapters as PEFT folders, bundles, merged models or GGUF LoRAs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from app.core.export import FORMATS


def register(subparsers, common) -> None:
    export = subparsers.add_parser("export", parents=[common], help="export an adapter to share or to use elsewhere",
                                   description="Formats: " + "; ".join(f"{key}: {label}" for key, label in FORMATS.items()))
    export.add_argument("name", help="adapter name in the library")
    export.add_argument("--format", choices=list(FORMATS), default="bundle", help="what to write (default: bundle)")
    export.add_argument("--out", metavar="PATH",
                        help="file or folder to write (default: NAME.tailor, NAME-peft, NAME-merged, NAME.gguf or NAME-ollama here); "
                             "a bundle or GGUF given an existing folder goes inside it")
    export.add_argument("--force", action="store_true", help="replace an earlier export at PATH")
    export.add_argument("--base", help="base model to merge into or convert for, if not the one the adapter names")
    export.set_defaults(handler=run_export)

    imported = subparsers.add_parser("import", parents=[common], help="add a .tailor bundle, PEFT folder or zip to the library")
    imported.add_argument("path", help="a .tailor file, a PEFT folder (with adapter_config.json), or a zip of one")
    imported.add_argument("--name", help="name in the library (default: the adapter's own name)")
    imported.add_argument("--base", help="base model to check it against (default: the one the adapter names)")
    imported.add_argument("--allow-pickle", action="store_true",
                          help="convert pickled adapter_model.bin weights (tensors only) to safetensors; "
                               "only for files you trust")
    imported.set_defaults(handler=run_import)


@contextmanager
def _progress_bar(title: str) -> Iterator:
    """A rich bar driven by the core's ShareProgress updates."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from app.cli.common import console

    bar = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), console=console, transient=True)
    task = bar.add_task("", total=None)

    def update(step) -> None:
        bar.update(task, description=step.message, completed=step.done, total=step.total)

    with bar:
        yield update


def run_export(args) -> int:
    from app.cli.common import console, open_library
    from app.core.export import export_adapter

    with _progress_bar(f"Exporting {args.name}") as update:
        target = export_adapter(open_library(args), args.name, args.format, args.out, force=args.force, base=args.base,
                                progress=update)
    console.print(f"[green]Exported '{args.name}'[/] as {FORMATS[args.format]}: {target}")
    if args.format == "gguf":
        console.print("Use it with llama.cpp: llama-cli -m BASE.gguf --lora " + str(target) +
                      "\nFor Ollama, export with --format ollama (adds the Modelfile).")
    elif args.format == "ollama":
        from app.core.export import ollama_model_name

        name = ollama_model_name(args.name)
        console.print(f"Use it with Ollama: cd {target} && ollama create {name} -f Modelfile && ollama run {name}",
                      soft_wrap=True, markup=False, highlight=False)
    elif args.format == "peft":
        print_vllm_readiness(open_library(args).get(args.name), target)
    return 0


def print_vllm_readiness(entry, location) -> None:
    """The exact `vllm serve` line for this adapter, or what stops vLLM from serving it and the fix."""
    from app.cli.common import console
    from app.core.export import VLLM_FIX, vllm_command, vllm_problems

    problems = vllm_problems(entry.adapter_config())
    if problems:
        console.print(f"[yellow]vLLM: not ready[/]: {'; '.join(problems)}.\n{VLLM_FIX.replace('NAME', entry.name)}")
    else:
        console.print("vLLM: ready. Serve it with:")
        console.print(vllm_command(entry, location), soft_wrap=True, markup=False, highlight=False)


def run_import(args) -> int:
    from app.cli.common import console, open_library
    from app.core.importer import import_adapter

    with _progress_bar("Importing") as update:
        entry = import_adapter(open_library(args), args.path, name=args.name, base=args.base,
                               allow_pickle=args.allow_pickle, progress=update)
    console.print(f"[green]Imported '{entry.name}'[/] into {entry.path}")
    return 0
