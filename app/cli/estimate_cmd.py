"""`tailor estimate`: how much memory a training run will need, before downloading or loading anything."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.core.catalogue import CATALOGUE, DEFAULT_KEY, ModelShape, find_entry
from app.core.config import QUANT_CHOICES
from app.core.errors import TailorError
from app.core.estimate import DEVICES, GB, checkpointing_words, estimate_training_memory, verdict


def register(subparsers, common: argparse.ArgumentParser) -> None:
    names = ", ".join(entry.key for entry in CATALOGUE)
    parser = subparsers.add_parser(
        "estimate", parents=[common], help="estimate the peak memory of a training run",
        description="Estimate the peak memory of a LoRA/QLoRA training run from the model's shape alone.",
    )
    parser.add_argument("--base", default="default", metavar="MODEL",
                        help=f"'default', a model folder with config.json, or a catalogue name: {names}")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--max-len", type=int, default=512, help="longest example in tokens (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="4bit", help="base weight precision (default 4bit)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="keep every activation instead of recomputing them (faster, much more memory)")
    parser.add_argument("--checkpoint-every-n-layers", type=int, default=1, metavar="N",
                        help="recompute only every N-th decoder block (default 1, every block; 2 is the middle step "
                             "Tailor's automatic checkpointing may pick)")
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="where the run would train (default: the device this machine has); "
                             "plan a GPU run from a laptop with --device cuda")
    parser.set_defaults(handler=run)


def resolve_shape(base: str) -> tuple[str, ModelShape]:
    """A display name and the shape for what the user typed; reads only local files, never the network."""
    entry = find_entry(DEFAULT_KEY if base == "default" else base)
    if entry is not None:
        return entry.display_name, entry.shape
    folder = Path(base).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise TailorError(f"The folder {folder} has no config.json, so its shape is unknown.",
                              "Point --base at the folder that holds the model's config.json.")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (ValueError, OSError) as exc:
            raise TailorError(f"Could not read {folder / 'config.json'}: {exc}") from exc
        return folder.name, ModelShape.from_hf_config(config)
    raise TailorError(
        f"'{base}' is neither a model folder nor in the catalogue.",
        "Use 'default', a folder with config.json, or one of: " + ", ".join(entry.key for entry in CATALOGUE),
    )


def checkpoint_bytes(base: str) -> int:
    """Bytes per weight in the files the model loads from: fp32 for the bundled model (Tailor converts its GGUF
    into an fp32 folder), what config.json says for a folder, bf16 (as published) for the catalogue's hub models."""
    if base == "default":
        return 4
    config = Path(base).expanduser() / "config.json"
    if config.is_file():
        import json

        raw = json.loads(config.read_text())
        return 4 if (raw.get("dtype") or raw.get("torch_dtype")) == "float32" else 2
    return 2


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.0f}M"


def run(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from app.core.models import pick_device

    name, shape = resolve_shape(args.base)
    device = args.device or pick_device()
    estimate = estimate_training_memory(
        shape, quant=args.quant, rank=args.rank, max_len=args.max_len, batch_size=args.batch_size,
        gradient_checkpointing=args.gradient_checkpointing, checkpoint_every_n_layers=args.checkpoint_every_n_layers,
        device=device, checkpoint_bytes=checkpoint_bytes(args.base),
    )

    console = Console()
    # soft_wrap: let the terminal wrap plain lines, so copied output and grep see whole lines.
    console.print(f"{escape(name)}: {_count(shape.parameter_count)} parameters, {args.quant}, on the {device.upper()}",
                  soft_wrap=True)
    console.print(f"LoRA rank {args.rank} ({estimate.lora_param_count:,} trainable), batch {args.batch_size} x "
                  f"{args.max_len} tokens, "
                  f"{checkpointing_words(args.gradient_checkpointing, args.checkpoint_every_n_layers)}",
                  soft_wrap=True)
    if not shape.is_known_architecture:
        console.print(f"[yellow]Tailor does not know the '{shape.architecture}' block layout; "
                      "it is sized like a Llama block, so treat the numbers as a rough guide.[/]", soft_wrap=True)
    table = Table()
    table.add_column("Part")
    table.add_column("Memory", justify="right")
    for label, amount in estimate.rows():
        table.add_row(label, f"{amount / GB:.2f} GB")
    console.print(table)
    console.print(f"Total: {estimate.total_gb:.2f} GB")
    console.print(_free_now(device, estimate.total), soft_wrap=True)
    return 0


def _free_now(device: str, total: int) -> str:
    """What is free where the run would train, and the verdict; on CUDA the GPU torch would use, by identity."""
    import psutil

    if device == "cpu":
        free = int(psutil.virtual_memory().available)
        return f"Free now: {free / GB:.2f} GB of system RAM — {verdict(total, free)}"
    from app.core.gpu import GpuMonitor, torch_device_identity
    from app.core.models import pick_device

    monitor = GpuMonitor()
    try:
        if pick_device() == "cuda":
            monitor.set_training_device(torch_device_identity())
        gpu = monitor.snapshot().training_gpu
    finally:
        monitor.shutdown()
    if gpu is None:
        return ("No NVIDIA GPU on this machine to weigh it against: compare the total with the free memory of the "
                "GPU you plan to train on (nvidia-smi shows it).")
    free = gpu.memory_total - gpu.memory_used
    return f"Free now: {free / GB:.2f} GB on GPU {gpu.index} ({gpu.name}) — {verdict(total, free)}"
