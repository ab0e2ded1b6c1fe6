"""Training throughput and peak memory: Tailor's trainer against a plain transformers Trainer + peft reference.

Both train the bundled SmolLM2-135M-Instruct in 4-bit NF4 on the same persona dataset, with the same chat template,
assistant-only labels, LoRA rank, max length, batch size, learning rate and seed. The reference pads each random
batch to its longest example (DataCollatorForSeq2Seq) and computes full logits, as most tutorials do; Tailor groups
batches by length (or packs them) and computes logits only where a token is trained.

Each side runs in its own process so peak RSS is its own. Throughput counts real (non-padding) tokens from the end of
the first step (warm-up) to the end of the last.

    python bench/train_throughput.py [--steps 8] [--batch-size 8] [--packing]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASET = REPO / "resources" / "datasets" / "pirate.jsonl"
SYSTEM_PROMPT = "You are Captain Tailor, a cheerful old pirate captain. Answer helpfully, always in pirate speech."
RANK, ALPHA, LEARNING_RATE, SEED = 16, 32, 2e-4, 42


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_tailor(args) -> dict:
    from app.core.config import DataSettings, LoraSettings, RunConfig, TrainingSettings
    from app.core.library import Library
    from app.core.training import StepEvent, run_training

    marks: list[tuple[float, int]] = []

    def sink(event) -> None:
        if isinstance(event, StepEvent):
            marks.append((time.monotonic(), event.tokens_seen))

    config = RunConfig(
        name="bench", system_prompt=SYSTEM_PROMPT,
        data=DataSettings(path=str(DATASET), max_len=args.max_len, packing=args.packing),
        lora=LoraSettings(rank=RANK, alpha=ALPHA),
        training=TrainingSettings(max_steps=args.steps, batch_size=args.batch_size, learning_rate=LEARNING_RATE,
                                  seed=SEED, checkpoint_every=10_000, gradient_checkpointing=args.gradient_checkpointing),
    )
    with tempfile.TemporaryDirectory() as library:
        run_training(config, Library(library), sink)
    if len(marks) != args.steps:
        raise SystemExit(f"expected an event per step, got {len(marks)} (steps too fast for the event throttle?)")
    (t0, tokens0), (t1, tokens1) = marks[0], marks[-1]
    return {"tokens": tokens1 - tokens0, "seconds": t1 - t0, "peak_rss": peak_rss_bytes()}


def run_reference(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments,
    )
    from datasets import Dataset

    from app.core.data import load_dataset_file, tokenize_dataset
    from app.core.models import load_tokenizer, resolve_base

    folder = resolve_base("default").folder
    tokenizer = load_tokenizer(folder)
    examples, _ = tokenize_dataset(tokenizer, load_dataset_file(DATASET), args.max_len, SYSTEM_PROMPT)
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
                                 for e in examples])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    model.config.use_cache = False
    torch.manual_seed(SEED)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    marks: list[tuple[float, int]] = []

    class CountingTrainer(Trainer):
        real_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            CountingTrainer.real_tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    class Marks(TrainerCallback):
        def on_step_end(self, arguments, state, control, **kwargs):
            marks.append((time.monotonic(), CountingTrainer.real_tokens))

    with tempfile.TemporaryDirectory() as output:
        trainer = CountingTrainer(
            model=model, train_dataset=dataset, callbacks=[Marks()],
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            args=TrainingArguments(output_dir=output, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                                   learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=int(0.03 * args.steps),
                                   seed=SEED, save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True,
                                   disable_tqdm=True, dataloader_num_workers=0),
        )
        trainer.train()
    (t0, tokens0), (t1, tokens1) = marks[0], marks[-1]
    return {"tokens": tokens1 - tokens0, "seconds": t1 - t0, "peak_rss": peak_rss_bytes()}


def child(side: str, args) -> dict:
    command = [sys.executable, __file__, "--child", side, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-len", str(args.max_len)] + (["--packing"] if args.packing else []) + \
              ([] if args.gradient_checkpointing else ["--no-gradient-checkpointing"])
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--packing", action="store_true", help="Tailor packs each batch into one row")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="Tailor's default; the reference never checkpoints")
    parser.add_argument("--child", choices=("tailor", "reference"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps((run_tailor if args.child == "tailor" else run_reference)(args)))
        return

    from app.core.models import resolve_base

    resolve_base("default")  # convert the bundled GGUF before timing, so neither side pays for it
    results = {side: child(side, args) for side in ("reference", "tailor")}
    print(f"SmolLM2-135M-Instruct, 4-bit NF4, rank {RANK}, batch {args.batch_size}, max length {args.max_len}, "
          f"{args.steps} steps (first excluded as warm-up), {'packing' if args.packing else 'length grouping'}, "
          f"Tailor gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    print(f"{'':12}{'real tokens':>12}{'seconds':>10}{'tokens/s':>10}{'peak RSS':>12}")
    speed = {}
    for side, result in results.items():
        speed[side] = result["tokens"] / result["seconds"]
        print(f"{side:12}{result['tokens']:>12}{result['seconds']:>10.1f}{speed[side]:>10.1f}"
              f"{result['peak_rss'] / 2**20:>9.0f} MiB")
    throughput_ratio = speed["tailor"] / speed["reference"]
    memory_ratio = results["tailor"]["peak_rss"] / results["reference"]["peak_rss"]
    print(f"tokens/s ratio (Tailor / reference): {throughput_ratio:.2f}x  (target >= 1.5x: {'met' if throughput_ratio >= 1.5 else 'NOT met'})")
    print(f"peak RSS ratio (Tailor / reference): {memory_ratio:.2f}x  (target <= 1.0x: {'met' if memory_ratio <= 1.0 else 'NOT met'})")


if __name__ == "__main__":
    main()
