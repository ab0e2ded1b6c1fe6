"""`tailor estimate --device cpu` against the peak resident memory of real CPU training runs of the bundled model.

Each setting trains the bundled SmolLM2-135M-Instruct in 4-bit for a few steps through the public `run_training`
API, in a fresh subprocess so its peak RSS (`ru_maxrss`, what the OS had to find in RAM) is its own, with the
allocator held to the live tensors as in a run planned as tight (the estimate's model; a comfortable run may use up
to UNPINNED_HEAP_GROWTH times more, which the memory plan allows for). The dataset
has replies longer than any max length tried, so every batch is max-length wide, the case the estimate sizes for;
the estimate is given the dataset's real share of trained tokens. A sampler thread also splits the peak into
"while loading" and "while training", to show which one the estimate has to cover.

The reference is the measurement itself: the ratio column is estimate / measured, and the goal is 0.85-1.15.

    python bench/estimate_vs_rss.py [--steps 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = (  # (batch size, max length, checkpointing every n-th block, 0: off): each varies once from (4, 256, 1)
    (1, 256, 1),
    (4, 256, 1),
    (4, 512, 1),
    (4, 512, 2),
    (4, 512, 0),
)
RANK = 16
SAMPLE_INTERVAL_S = 0.01


def checkpointing(every_n_layers: int) -> dict:
    """A setting's checkpointing as the estimate and TrainingSettings take it (every_n_layers 0: off)."""
    return {"gradient_checkpointing": every_n_layers > 0, "checkpoint_every_n_layers": max(every_n_layers, 1)}


def long_reply_dataset(path: Path, rows: int = 24) -> Path:
    """Chat examples whose replies run past 1024 tokens, built from the bundled pirate replies."""
    source = [json.loads(line) for line in (REPO / "resources" / "datasets" / "pirate.jsonl").read_text().splitlines()]
    with path.open("w") as out:
        for row in range(rows):
            user = source[row % len(source)]["messages"][0]["content"]
            reply = " ".join(source[(row + k) % len(source)]["messages"][1]["content"] for k in range(20))
            out.write(json.dumps({"messages": [{"role": "user", "content": user},
                                               {"role": "assistant", "content": reply}]}) + "\n")
    return path


def _rss_bytes() -> tuple[int, int]:
    """(resident, resident anonymous): the second leaves out file pages (the mapped checkpoint, libraries' code),
    which the kernel can drop and re-read rather than run out of memory."""
    import psutil

    info = psutil.Process().memory_info()
    return info.rss, info.rss - info.shared


def _child(batch: int, max_len: int, every_n_layers: int, steps: int, dataset: str) -> dict:
    import app.core.training as training
    from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
    from app.core.estimate import MemoryPlan
    from app.core.library import Library
    from app.core.training import StartEvent, run_training

    # What the estimate models: the live tensors, which is what a run planned as tight keeps to (glibc's mmap
    # threshold pinned). A comfortable run lets glibc keep freed blocks too; the plan allows UNPINNED_HEAP_GROWTH
    # for that on top of the estimate, and the allocator's share is not the estimate's to predict.
    planned = checkpointing(every_n_layers)
    training.memory_plan_for_run = lambda *args, **kwargs: MemoryPlan(
        "4bit", planned["gradient_checkpointing"], "set by the benchmark", return_freed_memory=True,
        checkpoint_every_n_layers=planned["checkpoint_every_n_layers"])

    peaks = {"loading": 0, "training": 0, "loading_anon": 0, "training_anon": 0}
    phase = ["loading"]
    done = threading.Event()

    def record() -> None:
        rss, anonymous = _rss_bytes()
        peaks[phase[0]] = max(peaks[phase[0]], rss)
        peaks[phase[0] + "_anon"] = max(peaks[phase[0] + "_anon"], anonymous)

    def sample() -> None:
        while not done.is_set():
            record()
            time.sleep(SAMPLE_INTERVAL_S)

    def sink(event) -> None:
        if isinstance(event, StartEvent):
            record()
            phase[0] = "training"

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    config = RunConfig(
        name="rss", data=DataSettings(path=dataset, max_len=max_len), model=ModelSource(quant="4bit"),
        lora=LoraSettings(rank=RANK, alpha=2 * RANK),
        training=TrainingSettings(max_steps=steps, batch_size=batch, checkpoint_every=10_000, **planned),
    )
    with tempfile.TemporaryDirectory() as library:
        run_training(config, Library(library), sink)
    done.set()
    sampler.join()
    return {**peaks, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def trained_share(dataset: Path, max_len: int) -> float:
    """Share of the tokens in max-length examples that carry a label, as the trainer will see them."""
    from app.core.data import IGNORE_INDEX, load_dataset_file, tokenize_dataset
    from app.core.models import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base("default").folder)
    examples, _ = tokenize_dataset(tokenizer, load_dataset_file(str(dataset)), max_len, None)
    total = sum(len(example.input_ids) for example in examples)
    trained = sum(label != IGNORE_INDEX for example in examples for label in example.labels[1:])
    return trained / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # batch max_len every_n_layers dataset
    args = parser.parse_args()
    if args.child:
        batch, max_len, every_n_layers, dataset = args.child
        print(json.dumps(_child(int(batch), int(max_len), int(every_n_layers), args.steps, dataset)))
        return 0

    from app.core.catalogue import DEFAULT_KEY, find_entry
    from app.core.estimate import GB, checkpointing_words, estimate_training_memory
    from app.core.precision import compute_dtype

    shape = find_entry(DEFAULT_KEY).shape
    dtype = compute_dtype("cpu").dtype
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as scratch:
        dataset = long_reply_dataset(Path(scratch) / "long.jsonl")
        for batch, max_len, every_n_layers in SETTINGS:
            command = [sys.executable, __file__, "--steps", str(args.steps), "--child", str(batch), str(max_len),
                       str(every_n_layers), str(dataset)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                print(result.stderr[-3000:], file=sys.stderr)
                failures += 1
                continue
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            share = trained_share(dataset, max_len)
            estimate = estimate_training_memory(shape, quant="4bit", rank=RANK, max_len=max_len, batch_size=batch,
                                                device="cpu", trained_share=share, checkpoint_bytes=4,  # fp32 file
                                                **checkpointing(every_n_layers))
            rows.append({"batch": batch, "max_len": max_len, "every_n_layers": every_n_layers, "trained_share": share,
                         "estimate": estimate.total, **measured,
                         "ratio": estimate.total / measured["ru_maxrss"]})

    print(f"SmolLM2-135M 4-bit on the CPU ({str(dtype).removeprefix('torch.')} compute), LoRA r{RANK}, "
          f"{args.steps} steps per run; GB = 2^30 bytes")
    print(f"{'batch':>5} {'len':>5} {'checkpointing':>32} {'trained':>8} {'load peak':>10} {'train peak':>11} "
          f"{'train anon':>11} {'peak RSS':>9} {'estimate':>9} {'est/RSS':>8}")
    for row in rows:
        setting = checkpointing(row["every_n_layers"])
        words = checkpointing_words(setting["gradient_checkpointing"], setting["checkpoint_every_n_layers"])
        print(f"{row['batch']:>5} {row['max_len']:>5} {words:>32} "
              f"{row['trained_share']:>8.0%} {row['loading'] / GB:>10.2f} {row['training'] / GB:>11.2f} "
              f"{row['training_anon'] / GB:>11.2f} {row['ru_maxrss'] / GB:>9.2f} {row['estimate'] / GB:>9.2f} "
              f"{row['ratio']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    outside = [row for row in rows if not 0.85 <= row["ratio"] <= 1.15]
    print(f"{len(rows) - len(outside)} of {len(rows)} settings within ±15%" + (f"; {failures} failed" if failures else ""))
    return 1 if outside or failures else 0


if __name__ == "__main__":
    sys.exit(main())
