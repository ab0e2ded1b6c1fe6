"""`tailor train`: fine-tune a persona adapter into the library."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.core.config import (
    ALL_LINEAR, DATA_FORMATS, KEEP_CHOICES, METHODS, SCHEDULES, TRAINING_QUANTS, DataSettings, LoraSettings,
    ModelSource, RunConfig, TrainingSettings,
)

# Flag defaults come from the settings dataclasses, so the CLI, the wizard and the docs never disagree.
LORA, TRAINING, MODEL = LoraSettings(), TrainingSettings(), ModelSource()
DATA = DataSettings(path="-")

EXIT_PAUSED = 130


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("train", parents=[common], help="train a persona adapter from a dataset")
    parser.add_argument("--data", required=True, metavar="FILE", help="dataset file or save_to_disk folder")
    parser.add_argument("--base", default="default", help="default | model folder | FILE.gguf | hub id (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--name", help="persona/adapter name (default: the dataset's file name)")
    parser.add_argument("--system", metavar="PROMPT", help="the persona's system prompt, used in training and chat")
    parser.add_argument("--rank", type=int, default=LORA.rank)
    parser.add_argument("--alpha", type=float, default=LORA.alpha)
    parser.add_argument("--dropout", type=float, default=LORA.dropout)
    parser.add_argument("--targets", default=ALL_LINEAR, help="comma-separated module names, or all-linear")
    parser.add_argument("--dora", action="store_true", help="use DoRA (weight-decomposed LoRA)")
    parser.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank)")
    parser.add_argument("--method", choices=METHODS, default=LORA.method,
                        help="lora: one rank everywhere; adalora: start at --init-r and prune to an average of "
                             "--target-r, giving rank to the layers that need it")
    parser.add_argument("--init-r", type=int, default=LORA.init_r, help="AdaLoRA: starting rank of every layer")
    parser.add_argument("--target-r", type=int, default=LORA.target_r, help="AdaLoRA: average rank after pruning")
    parser.add_argument("--tinit", type=float, default=LORA.tinit, metavar="SHARE",
                        help="AdaLoRA: share of the steps trained before pruning starts")
    parser.add_argument("--tfinal", type=float, default=LORA.tfinal, metavar="SHARE",
                        help="AdaLoRA: share of the steps at the end trained with the final ranks")
    parser.add_argument("--delta-t", type=int, default=LORA.deltaT, metavar="STEPS",
                        help="AdaLoRA: steps between two reallocations of the rank budget")
    parser.add_argument("--epochs", type=float, default=TRAINING.epochs)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--lr", type=float, default=TRAINING.learning_rate, help="peak learning rate")
    parser.add_argument("--schedule", choices=SCHEDULES, default=TRAINING.lr_schedule)
    parser.add_argument("--max-len", type=int, default=DATA.max_len, help="longest example in tokens")
    parser.add_argument("--batch-size", type=int, default=TRAINING.batch_size)
    parser.add_argument("--grad-accum", type=int, default=TRAINING.grad_accum)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=TRAINING.gradient_checkpointing,
                        help="recompute activations: much less memory, slower steps (default: automatic, off when "
                             "the run fits comfortably without it, on when memory is tight)")
    parser.add_argument("--checkpoint-every-n-layers", type=int, default=TRAINING.checkpoint_every_n_layers,
                        metavar="N",
                        help="with --gradient-checkpointing: recompute only every N-th decoder block (2: about 1.2x "
                             "faster steps for some more memory; default 1, every block). Automatic checkpointing "
                             "picks it itself")
    parser.add_argument("--packing", action="store_true", help="pack each batch into one row (no padding)")
    parser.add_argument("--seed", type=int, default=TRAINING.seed)
    parser.add_argument("--checkpoint-every", type=int, default=TRAINING.checkpoint_every, metavar="STEPS")
    parser.add_argument("--quant", choices=TRAINING_QUANTS, default=MODEL.quant,
                        help="how the base is held: auto (16-bit when it fits comfortably, else 4-bit), 4bit, 8bit, none")
    parser.add_argument("--format", choices=DATA_FORMATS, default="auto", help="dataset layout (default: detect)")
    parser.add_argument("--prompt-column", help="for CSV/Parquet: the prompt column")
    parser.add_argument("--response-column", help="for CSV/Parquet: the response column")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a hub model to run its own code")
    parser.add_argument("--eval-split", type=float, metavar="FRACTION|0",
                        help="share of the rows held out to measure the eval loss (default: 10%%, at most 50 rows, "
                             "none below 20 rows; 0 turns evaluation off)")
    parser.add_argument("--eval-data", metavar="FILE", help="held-out examples from this file instead of a split")
    parser.add_argument("--eval-every", type=int, metavar="STEPS", help="held-out loss every N steps (default: ~5 per run)")
    parser.add_argument("--keep", choices=KEEP_CHOICES, default=TRAINING.keep,
                        help="publish the adapter with the lowest held-out loss (best) or the final one (last)")
    parser.add_argument("--show-samples", action="store_true",
                        help="at each evaluation, print the persona's replies to two held-out prompts")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run of this adapter")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the settings and show trainable parameters, adapter size and memory against a "
                             "full fine-tune; trains and writes nothing")
    parser.set_defaults(handler=run)


def config_from_args(args, name: str) -> RunConfig:
    return RunConfig(
        name=name,
        system_prompt=args.system,
        model=ModelSource(base=args.base, quant=args.quant, trust_remote_code=args.trust_remote_code),
        data=DataSettings(path=str(Path(args.data).expanduser().resolve()), format=args.format,
                          prompt_column=args.prompt_column, response_column=args.response_column,
                          max_len=args.max_len, packing=args.packing, eval_split=args.eval_split,
                          eval_path=str(Path(args.eval_data).expanduser().resolve()) if args.eval_data else None),
        lora=LoraSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                          target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                          use_dora=args.dora, use_rslora=args.rslora, method=args.method, init_r=args.init_r,
                          target_r=args.target_r, tinit=args.tinit, tfinal=args.tfinal, deltaT=args.delta_t),
        training=TrainingSettings(epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr,
                                  lr_schedule=args.schedule, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                  gradient_checkpointing=args.gradient_checkpointing,
                                  checkpoint_every_n_layers=args.checkpoint_every_n_layers, seed=args.seed,
                                  checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, keep=args.keep),
    )


def run(args) -> int:
    from app.cli.common import open_library, train_with_progress

    library = open_library(args)
    wanted = args.name or Path(args.data).stem
    # An explicit name is the user's choice and must not silently change; a name derived from the file may.
    name = wanted if args.name or args.resume else library.unique_name(wanted)
    if args.dry_run:
        return dry_run(config_from_args(args, name), library, args.resume)
    result = train_with_progress(config_from_args(args, name), library, resume=args.resume,
                                 show_samples=args.show_samples)
    return EXIT_PAUSED if result.paused else 0


def dry_run(config: RunConfig, library, resume: bool) -> int:
    """Everything a real run checks before it loads the model, then the footprint; nothing is trained or written."""
    from app.cli.common import console
    from app.core.data import load_dataset_file
    from app.core.footprint import footprint
    from app.core.training import check_run_name

    config = check_run_name(config, library, resume)
    data = config.data
    rows = load_dataset_file(data.path, data.format, data.prompt_column, data.response_column).rows
    steps = config.training.planned_steps(rows)
    console.print(f"Dry run of '{config.name}': nothing is trained or written.")
    console.print(f"Dataset: {rows} rows, about {steps} optimizer steps.", highlight=False)
    console.print(footprint(config, total_steps=steps).to_text(), highlight=False)
    return 0
