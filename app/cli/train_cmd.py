"""`tailor train`: fine-tune a persona adapter into the library."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.core.config import (
    ALL_LINEAR, DATA_FORMATS, QUANT_CHOICES, SCHEDULES, DataSettings, LoraSettings, ModelSource, RunConfig,
    TrainingSettings,
)

EXIT_PAUSED = 130


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("train", parents=[common], help="train a persona adapter from a dataset")
    parser.add_argument("--data", required=True, metavar="FILE", help="dataset file or save_to_disk folder")
    parser.add_argument("--base", default="default", help="default | model folder | FILE.gguf | hub id (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--name", help="persona/adapter name (default: the dataset's file name)")
    parser.add_argument("--system", metavar="PROMPT", help="the persona's system prompt, used in training and chat")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--targets", default=ALL_LINEAR, help="comma-separated module names, or all-linear")
    parser.add_argument("--dora", action="store_true", help="use DoRA (weight-decomposed LoRA)")
    parser.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank)")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    parser.add_argument("--max-len", type=int, default=512, help="longest example in tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute activations: much less memory for ~30%% more time (default: on)")
    parser.add_argument("--packing", action="store_true", help="pack each batch into one row (no padding)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--checkpoint-every", type=int, default=50, metavar="STEPS")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="4bit")
    parser.add_argument("--format", choices=DATA_FORMATS, default="auto", help="dataset layout (default: detect)")
    parser.add_argument("--prompt-column", help="for CSV/Parquet: the prompt column")
    parser.add_argument("--response-column", help="for CSV/Parquet: the response column")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a hub model to run its own code")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run of this adapter")
    parser.set_defaults(handler=run)


def config_from_args(args, name: str) -> RunConfig:
    return RunConfig(
        name=name,
        system_prompt=args.system,
        model=ModelSource(base=args.base, quant=args.quant, trust_remote_code=args.trust_remote_code),
        data=DataSettings(path=str(Path(args.data).expanduser().resolve()), format=args.format,
                          prompt_column=args.prompt_column, response_column=args.response_column,
                          max_len=args.max_len, packing=args.packing),
        lora=LoraSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                          target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                          use_dora=args.dora, use_rslora=args.rslora),
        training=TrainingSettings(epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
                                  lr_schedule=args.schedule, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                  gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
                                  checkpoint_every=args.checkpoint_every),
    )


def run(args) -> int:
    from app.cli.common import open_library, train_with_progress

    library = open_library(args)
    wanted = args.name or Path(args.data).stem
    # An explicit name is the user's choice and must not silently change; a name derived from the file may.
    name = wanted if args.name or args.resume else library.unique_name(wanted)
    result = train_with_progress(config_from_args(args, name), library, resume=args.resume)
    return EXIT_PAUSED if result.paused else 0
