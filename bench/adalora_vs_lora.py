"""AdaLoRA against plain LoRA at the same final parameter budget: held-out loss and training time.

Plain LoRA trains rank `--rank` in every adapted layer. AdaLoRA starts at `--init-r` and prunes to an average of
`--rank` per layer (its target_r), moving rank to the layers that need it; its published adapter is a plain LoRA of
the same budget. Both run as `tailor train` with every other setting at Tailor's defaults and the same seed, on each
sample persona dataset, one after the other (run it alone: the times are wall-clock). The held-out loss is the one
the trainer measured on the same automatic held-out split for both (same rows, same seed), at the step it kept.

    python bench/adalora_vs_lora.py [--datasets pirate butler] [--rank 16 --init-r 24]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = {path.stem: path for path in sorted((REPO / "resources" / "datasets").iterdir()) if path.suffix in (".jsonl", ".csv")}


def train(library: Path, dataset: Path, name: str, flags: list[str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "app.cli", "train", "--library", str(library), "--data", str(dataset),
                           "--name", name, "--seed", "1", *flags],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"training {name} failed:\n{done.stderr[-3000:]}")
    manifest = json.loads((library / "adapters" / name / "tailor.json").read_text(encoding="utf-8"))
    return {"seconds": seconds, "eval_loss": manifest["eval_loss"], "kept_step": manifest["kept_step"],
            "steps": manifest["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["pirate", "butler"], choices=sorted(DATASETS))
    parser.add_argument("--rank", type=int, default=16, help="LoRA's rank, and AdaLoRA's target average rank")
    parser.add_argument("--init-r", type=int, default=24, help="AdaLoRA's starting rank")
    args = parser.parse_args()
    methods = {
        "lora": ["--method", "lora", "--rank", str(args.rank), "--alpha", str(2 * args.rank)],
        "adalora": ["--method", "adalora", "--init-r", str(args.init_r), "--target-r", str(args.rank),
                    "--alpha", str(2 * args.rank)],
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dataset in args.datasets:
            for method, flags in methods.items():
                result = train(Path(folder), DATASETS[dataset], f"{dataset}-{method}", flags)
                rows.append({"dataset": dataset, "method": method, **result})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nSame final budget: rank {args.rank} per layer on average (AdaLoRA from {args.init_r}); Tailor's defaults "
          "otherwise, seed 1.")
    print(f"{'dataset':<10}{'method':<9}{'held-out loss':>14}{'kept/steps':>12}{'train s':>9}")
    for row in rows:
        print(f"{row['dataset']:<10}{row['method']:<9}{row['eval_loss']:>14.3f}{row['kept_step']:>7}/{row['steps']:<4}"
              f"{row['seconds']:>9.0f}")
    for dataset in args.datasets:
        lora, ada = (next(r for r in rows if r["dataset"] == dataset and r["method"] == m) for m in methods)
        print(f"{dataset}: AdaLoRA held-out loss {ada['eval_loss'] / lora['eval_loss']:.3f}x LoRA's, "
              f"time {ada['seconds'] / lora['seconds']:.2f}x")


if __name__ == "__main__":
    main()
