"""Training throughput and peak memory: Tailor's defaults against the tuned standard recipe, TRL's SFTTrainer.

Both sides train the bundled SmolLM2-135M-Instruct, 4-bit NF4 with double quantisation (BitsAndBytesConfig), on the
same examples: the sample persona datasets (resources/datasets/*.jsonl), tokenised once by Tailor's own chat-template
code with its max length, so both see identical token ids and identical trained (assistant) positions. Both use
Tailor's default LoRA (rank, alpha, dropout, all-linear targets) and training settings (batch size, learning rate,
schedule, warm-up, clipping, seed), the same compute dtype and device as Tailor picks, and the same gradient
checkpointing setting; the whole comparison runs once with checkpointing on and once with it off.

The reference is the recipe TRL's documentation recommends, tuned for this hardware rather than copied from a
tutorial:
- `SFTTrainer` on a pre-tokenised dataset with a `completion_mask`, `completion_only_loss=True`: loss on the
  assistant tokens only, like Tailor;
- length-grouped batches (`train_sampling_strategy="group_by_length"`, the sampler behind the old
  `group_by_length=True`) with dynamic padding to each batch's longest row. TRL's padding-free mode and BFD packing
  are only correct with FlashAttention (position ids alone do not stop attention across examples under SDPA), which
  does not run on a CPU, so length grouping is the strongest correct choice here; on CUDA with flash-attn installed,
  `--reference-padding-free` switches it on;
- TRL's fused, chunked LM head (it never builds the full logits tensor), `bf16`/`fp16` set to match Tailor's
  compute dtype, non-reentrant checkpointing like Tailor's, dataloading in the main process (on 2 cores a worker
  process only competes with the trainer), no logging or saving during the run.

Each side runs in its own process so its peak RSS is its own. Reported per run: whole-process wall time (import,
load, train, save the adapter), steady-state real (non-padding) tokens/s from the end of the first step (warm-up)
to the end of the last, and peak RSS. Run it under the shared lock:

    flock /tmp/tailor-heavy.lock .venv/bin/python bench/train_throughput.py [--steps 24] [--max-len 512]
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

DATASETS = sorted((REPO / "resources" / "datasets").glob("*.jsonl"))
SIDES = ("reference", "tailor", "tailor-4bit")
"""Tailor's defaults (quant 'auto': 16-bit LoRA when the run fits comfortably, as it does for this model), and Tailor
held to 4-bit like the reference, so the table shows both what a user gets and the like-for-like comparison."""


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def steady_rate(marks: list[tuple[float, int]], steps: int) -> tuple[int, float]:
    """(real tokens, seconds) from the end of the first step to the end of the last: the first step pays warm-up."""
    if len(marks) != steps:
        raise SystemExit(f"expected a mark per step, got {len(marks)} of {steps}")
    (t0, tokens0), (t1, tokens1) = marks[0], marks[-1]
    return tokens1 - tokens0, t1 - t0


def tailor_config(args, quant: str):
    from app.core.config import DataSettings, ModelSource, RunConfig, TrainingSettings

    # Tailor's defaults, apart from the run length, the checkpoint interval (none mid-run), the setting compared, and
    # no held-out evaluation: the reference evaluates nothing, and eval passes inside the timed window would be work
    # the other side does not do.
    return RunConfig(
        name="bench", data=DataSettings(path=args.data, max_len=args.max_len, eval_split=0),
        model=ModelSource(quant=quant),
        training=TrainingSettings(max_steps=args.steps, checkpoint_every=10_000,
                                  gradient_checkpointing=args.gradient_checkpointing),
    )


def run_tailor(args, quant: str = "auto") -> dict:
    from app.core.library import Library
    from app.core.training import StepEvent, run_training

    marks: list[tuple[float, int]] = []

    def sink(event) -> None:
        if isinstance(event, StepEvent):
            marks.append((time.monotonic(), event.tokens_seen))

    with tempfile.TemporaryDirectory() as library:
        result = run_training(tailor_config(args, quant), Library(library), sink)
        used = result.adapter.manifest["quant"]
    tokens, seconds = steady_rate(marks, args.steps)
    return {"tokens": tokens, "seconds": seconds, "peak_rss": peak_rss_bytes(), "quant": used}


def reference_dataset(config, tokenizer):
    """Tailor's tokenisation of the same file, as TRL's pre-tokenised format: ids plus the mask of trained tokens."""
    from datasets import Dataset

    from app.core.data import IGNORE_INDEX, load_dataset_file, tokenize_dataset

    loaded = load_dataset_file(config.data.path, config.data.format)
    examples, _ = tokenize_dataset(tokenizer, loaded, config.data.max_len, config.system_prompt)
    return Dataset.from_list([
        {"input_ids": e.input_ids, "completion_mask": [int(label != IGNORE_INDEX) for label in e.labels]}
        for e in examples
    ])


def run_reference(args) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from app.core.models import load_tokenizer, pick_device, quiet_transformers, resolve_base
    from app.core.precision import compute_dtype

    quiet_transformers()
    config = tailor_config(args, "4bit")
    lora, training = config.lora, config.training
    device = pick_device()
    dtype = compute_dtype(device).dtype  # whatever Tailor computes in on this machine, the reference does too
    folder = resolve_base(config.model.base).folder
    tokenizer = load_tokenizer(folder)
    dataset = reference_dataset(config, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": device}, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.peft_target_modules(), bias="none", task_type="CAUSAL_LM")
    marks: list[tuple[float, int]] = []

    class CountingTrainer(SFTTrainer):
        real_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            CountingTrainer.real_tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs \
                else int(inputs["input_ids"].numel())  # padding-free: one row, no padding at all
            return super().training_step(model, inputs, num_items_in_batch)

    class Marks(TrainerCallback):
        def on_step_end(self, arguments, state, control, **kwargs):
            marks.append((time.monotonic(), CountingTrainer.real_tokens))

    with tempfile.TemporaryDirectory() as output:
        sft = SFTConfig(
            output_dir=output, max_steps=args.steps,
            per_device_train_batch_size=training.batch_size, gradient_accumulation_steps=training.grad_accum,
            learning_rate=training.learning_rate, lr_scheduler_type=training.lr_schedule,
            warmup_steps=int(training.warmup_ratio * args.steps), weight_decay=training.weight_decay,
            max_grad_norm=training.max_grad_norm, seed=training.seed, data_seed=training.seed,
            max_length=config.data.max_len, completion_only_loss=True,
            train_sampling_strategy="group_by_length", padding_free=args.reference_padding_free,
            gradient_checkpointing=training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device == "cpu",
            dataloader_num_workers=0, dataloader_pin_memory=device == "cuda",
            save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        )
        trainer = CountingTrainer(model=model, args=sft, train_dataset=dataset, processing_class=tokenizer,
                                  peft_config=peft_config, callbacks=[Marks()])
        trainer.train()
        trainer.save_model(output)  # saving the adapter is part of the whole process on both sides
    tokens, seconds = steady_rate(marks, args.steps)
    return {"tokens": tokens, "seconds": seconds, "peak_rss": peak_rss_bytes()}


def child(side: str, args, gradient_checkpointing: bool) -> dict:
    command = [sys.executable, __file__, "--child", side, "--steps", str(args.steps), "--max-len", str(args.max_len),
               "--data", args.data, "--gradient-checkpointing" if gradient_checkpointing else "--no-gradient-checkpointing"]
    if args.reference_padding_free:
        command.append("--reference-padding-free")
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{done.stderr[-4000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall": wall}


def combined_dataset(folder: Path) -> str:
    """The sample persona datasets as one file, so both sides read exactly the same rows."""
    path = folder / "personas.jsonl"
    path.write_text("".join(dataset.read_text(encoding="utf-8") for dataset in DATASETS), encoding="utf-8")
    return str(path)


def print_table(args, results: dict) -> None:
    from app.core.models import pick_device
    from app.core.precision import compute_dtype

    device = pick_device()
    used = next(iter(results.values()))["tailor"].get("quant")
    print(f"SmolLM2-135M-Instruct; reference 4-bit NF4; Tailor defaults (quant auto chose '{used}'; tailor-4bit is "
          f"held to NF4), {device.upper()}, compute "
          f"{str(compute_dtype(device).dtype).removeprefix('torch.')}, max length {args.max_len}, {args.steps} steps "
          f"(tokens/s excludes the first step), data: {', '.join(d.name for d in DATASETS)}")
    print(f"reference: TRL SFTTrainer, completion-only loss, "
          f"{'padding-free' if args.reference_padding_free else 'group_by_length'}, fused chunked LM head")
    header = f"{'checkpointing':<14}{'side':<13}{'whole s':>9}{'real tok':>10}{'steady s':>10}{'tok/s':>9}{'peak RSS':>11}"
    print(header)
    print("-" * len(header))
    for checkpointing, sides in results.items():
        for side, result in sides.items():
            rate = result["tokens"] / result["seconds"]
            print(f"{checkpointing:<14}{side:<13}{result['wall']:>9.1f}{result['tokens']:>10}{result['seconds']:>10.1f}"
                  f"{rate:>9.1f}{result['peak_rss'] / 2**20:>7.0f} MiB")
    print()
    print(f"{'checkpointing, side':<26}{'tok/s ratio':>12}{'whole-time ratio':>18}{'peak RSS ratio':>16}   (Tailor / reference)")
    for checkpointing, sides in results.items():
        reference = sides["reference"]
        for side in ("tailor", "tailor-4bit"):
            tailor = sides[side]
            speed = (tailor["tokens"] / tailor["seconds"]) / (reference["tokens"] / reference["seconds"])
            memory = tailor["peak_rss"] / reference["peak_rss"]
            verdict = "met" if speed >= 1.5 and memory <= 1.0 else "NOT met"
            print(f"{checkpointing + ' ' + side:<26}{speed:>11.2f}x{tailor['wall'] / reference['wall']:>17.2f}x"
                  f"{memory:>15.2f}x   goal >= 1.5x at <= 1.0x: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both",
                        help="gradient checkpointing on both sides: compare with it on, off, or both (default)")
    parser.add_argument("--reference-padding-free", action="store_true",
                        help="TRL's padding-free batches (correct only with FlashAttention, i.e. CUDA + flash-attn)")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = {"tailor": run_tailor, "tailor-4bit": lambda a: run_tailor(a, "4bit"), "reference": run_reference}
        print(json.dumps(run[args.child](args)))
        return

    from app.core.models import resolve_base

    resolve_base("default")  # convert the bundled GGUF before timing, so neither side pays for it
    settings = {"both": (True, False), "on": (True,), "off": (False,)}[args.checkpointing]
    with tempfile.TemporaryDirectory() as scratch:
        args.data = combined_dataset(Path(scratch))
        results = {("on" if on else "off"): {side: child(side, args, on) for side in SIDES} for on in settings}
    print_table(args, results)


if __name__ == "__main__":
    main()
