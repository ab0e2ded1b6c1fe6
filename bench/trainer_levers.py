"""What each speed lever of Tailor's trainer buys: seconds per optimizer step of `run_training` itself, one lever
changed at a time, against the trainer's previous defaults measured in the same run.

Levers: gradient checkpointing (on / off), LoRA dropout (0.05 / 0), compute dtype on the CPU (fp32 / bf16, where
the CPU has native bf16: AMX or AVX512-BF16), glibc's allocator (mmap threshold pinned so freed memory goes straight
back to the OS, or left to glibc so freed blocks are reused), the LoRA forward (peft's, or app.core.fused_lora's),
the attention kernel of short batches (fused, or eager: app.core.attention) and the base's precision (16-bit /
4-bit); then, on the new defaults, torch's threads cut to one and every decoder block compiled with torch.compile
(not kept), and gradient checkpointing on every other block only (kept: automatic checkpointing's middle step). The
reference row is the trainer as it shipped before these levers: fp32, dropout 0.05, checkpointing on, allocator
pinned, peft's forward, fused attention, 16-bit base. Each configuration runs in its own process on the cowboy persona (batch 8,
rank 16 on all linears, no held-out split), and is timed from the end of its first step (warm-up) to the end of the
last; peak RSS is the process's own. "To step 1" is the time from the start of `run_training` to the end of its
first step: loading, and torch.compile's compiling where it is on.

    python bench/trainer_levers.py [--steps 6] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATASET = REPO / "resources" / "datasets" / "cowboy.jsonl"

REFERENCE = {"checkpointing": True, "dropout": 0.05, "bf16": False, "pinned": True, "quant": "none", "fused": False,
             "eager": False, "threads": None, "compile": False, "every_n_layers": 1}
NEW_DEFAULTS = {"checkpointing": False, "dropout": 0.0, "bf16": True, "pinned": False, "fused": True, "eager": True}
VARIANTS = {
    "previous defaults (reference)": {},
    "checkpointing off": {"checkpointing": False},
    "+ dropout 0": {"checkpointing": False, "dropout": 0.0},
    "+ bf16 (AMX or AVX512-BF16)": {"checkpointing": False, "dropout": 0.0, "bf16": True},
    "+ allocator unpinned": {"checkpointing": False, "dropout": 0.0, "bf16": True, "pinned": False},
    "+ fused LoRA forward": {**NEW_DEFAULTS, "eager": False},
    "+ eager attention for short batches (new defaults)": NEW_DEFAULTS,
    "new defaults, checkpointing on": {**NEW_DEFAULTS, "checkpointing": True},
    "new defaults, fp32 compute": {**NEW_DEFAULTS, "bf16": False},
    "new defaults, 4-bit base": {**NEW_DEFAULTS, "quant": "4bit"},
    "new defaults, one thread": {**NEW_DEFAULTS, "threads": 1},
    "new defaults, torch.compile of each block": {**NEW_DEFAULTS, "compile": True},
    "new defaults, checkpointing every other block": {**NEW_DEFAULTS, "checkpointing": True, "every_n_layers": 2},
}


def measure(settings: dict, steps: int) -> dict:
    """One configuration, in this process: seconds per step after the first, and peak RSS."""
    import torch

    import app.core.attention as attention
    import app.core.precision as precision
    import app.core.training as training
    from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
    from app.core.estimate import MemoryPlan
    from app.core.library import Library

    bf16 = settings["bf16"] and bool(precision.cpu_bf16_flags())  # emulated bf16 is not a lever worth timing
    precision._cpu_precision_here = lambda workload: precision.ComputePrecision(
        torch.bfloat16 if bf16 else torch.float32, False, "set by the benchmark")
    if not settings["fused"]:
        training.fuse_lora_layers = lambda model: 0
    if not settings["eager"]:
        attention.CPU_EAGER_MAX_LEN = 0
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    fuse = training.fuse_lora_layers

    def set_up_layers(model):
        fused = fuse(model)
        if settings["compile"]:
            for block in model.get_base_model().model.layers:
                block.compile()
        return fused

    training.fuse_lora_layers = set_up_layers
    training.memory_plan_for_run = lambda *args, **kwargs: MemoryPlan(
        settings["quant"], settings["checkpointing"], "set by the benchmark", return_freed_memory=settings["pinned"],
        checkpoint_every_n_layers=settings["every_n_layers"])
    marks: list[float] = []
    config = RunConfig(
        name="levers", data=DataSettings(path=str(DATASET), eval_split=0),
        model=ModelSource(quant=settings["quant"]), lora=LoraSettings(dropout=settings["dropout"]),
        training=TrainingSettings(max_steps=steps, checkpoint_every=10_000,
                                  gradient_checkpointing=settings["checkpointing"],
                                  checkpoint_every_n_layers=settings["every_n_layers"]))
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as library:
        training.run_training(config, Library(library),
                              lambda event: isinstance(event, training.StepEvent) and marks.append(time.monotonic()))
    if len(marks) != steps:
        raise SystemExit(f"expected a step event per step, got {len(marks)} of {steps}")
    return {"s_per_step": (marks[-1] - marks[0]) / (steps - 1), "to_first_step": marks[0] - started,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), metavar="NAME",
                        help="measure only these configurations (the speed-up is then against the first of them)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure({**REFERENCE, **json.loads(args.child)}, args.steps)))
        return
    results = {}
    for name, change in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", json.dumps(change)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]['s_per_step']:.2f} s/step", flush=True)
    reference = results.get("previous defaults (reference)") or next(iter(results.values()))
    print(f"\nSmolLM2-135M-Instruct, cowboy persona, batch 8, rank 16 all-linear, {args.steps} steps (first one excluded)")
    print(f"{'configuration':<52}{'s/step':>8}{'speed-up':>10}{'peak RSS':>11}{'to step 1':>11}")
    for name, result in results.items():
        print(f"{name:<52}{result['s_per_step']:>8.2f}{reference['s_per_step'] / result['s_per_step']:>9.2f}x"
              f"{result['peak_rss'] / 2**20:>7.0f} MiB{result['to_first_step']:>10.1f}s")


if __name__ == "__main__":
    main()
