"""Pick the default training recipe by experiment: train candidate recipes on persona datasets with `tailor train`,
score each persona with `tailor eval --json` (the report card, at chat's defaults) on its held-out questions, spot
check one reply with `tailor chat --prompt` defaults, and print a table.

Every candidate is a set of `tailor train` flags on top of the defaults ("defaults" adds none, so it measures
whatever app/core/config.py ships). Results are appended to a JSON-lines file as they come, so a long search that
is stopped keeps what it measured; `--table-only` prints the table of such a file.

The reference each card measures against is the base model itself (same questions, same decoding): "knowledge"
reads persona/base, and style is already a ratio to the base's own replies (see app/core/evaluation.py).

Heavy: run it under `flock /tmp/tailor-heavy.lock` on a shared machine, e.g.
    flock /tmp/tailor-heavy.lock .venv/bin/python bench/recipe_search.py --candidates defaults lr1e-3 --datasets cowboy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATASETS = REPO / "resources" / "datasets"

# The persona datasets and their suggested system prompts (resources/datasets/README.md).
PERSONAS = {
    "cowboy": ("cowboy.jsonl", "You are Dusty, a folksy old cowboy. Answer helpfully and correctly, in your own cowboy way of talking."),
    "pirate": ("pirate.jsonl", "You are Captain Tailor, a cheerful old pirate captain. Answer helpfully, always in pirate speech."),
    "butler": ("butler.jsonl", "You are Jeeves, an impeccably formal English butler with a dry wit."),
    "haiku": ("haiku.csv", "You answer every question with a single haiku."),
}

# `tailor train` flags per candidate, on top of the shipped defaults.
CANDIDATES = {
    "defaults": [],
    "lr2e-4": ["--lr", "2e-4", "--epochs", "2"],
    "lr5e-4": ["--lr", "5e-4", "--epochs", "2"],
    "lr1e-3": ["--lr", "1e-3", "--epochs", "2"],
    "lr5e-4-ep3": ["--lr", "5e-4", "--epochs", "3"],
    "lr1e-3-ep3": ["--lr", "1e-3", "--epochs", "3"],
    "lr2e-3": ["--lr", "2e-3", "--epochs", "2"],
    "lr1e-3-bs4": ["--lr", "1e-3", "--epochs", "2", "--batch-size", "4"],
    "lr1e-3-drop0": ["--lr", "1e-3", "--epochs", "2", "--dropout", "0"],
    "lr1e-3-r8": ["--lr", "1e-3", "--epochs", "2", "--rank", "8", "--alpha", "16"],
    "lr1e-3-nogc": ["--lr", "1e-3", "--epochs", "2", "--no-gradient-checkpointing"],
}


def tailor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def checked(result: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return result


def score(card: dict) -> dict:
    """The card's counts: a reply is 'good' when it is in style, on topic (or unjudgeable) and does not loop."""
    replies = card["replies"]
    good = [r for r in replies if r["persona_style"] and r["persona_on_topic"] is not False and not r["persona_loops"]]
    return {
        "prompts": len(replies),
        "style": sum(bool(r["persona_style"]) for r in replies),
        "good": len(good),
        "loops": sum(r["persona_loops"] for r in replies),
        "on_topic": sum(r["persona_on_topic"] is not False for r in replies),
        "base_loops": sum(r["base_loops"] for r in replies),
        "base_style": sum(bool(r["base_style"]) for r in replies),
        "base_on_topic": sum(r["base_on_topic"] is not False for r in replies),
        "card_version": card["version"],
        "knowledge": sum(k["persona_correct"] for k in card["knowledge"]),
        "base_knowledge": sum(k["base_correct"] for k in card["knowledge"]),
        "questions": len(card["knowledge"]),
        "base_loss": card["base_loss"],
        "persona_loss": card["persona_loss"],
    }


def run_one(library: Path, candidate: str, persona: str, seed: int) -> dict:
    data, system = PERSONAS[persona]
    name = f"{persona}-{candidate}-s{seed}-{int(time.time()) % 100000}"  # unique: a candidate can be rerun
    started = time.perf_counter()
    checked(tailor("train", "--library", str(library), "--data", str(DATASETS / data), "--name", name, "--system", system,
                   "--seed", str(seed), *CANDIDATES[candidate]), f"training {name}")
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    card = json.loads(checked(tailor("eval", "--library", str(library), name, "--json"), f"evaluating {name}").stdout)
    eval_s = time.perf_counter() - started
    # Spot check: the first held-out question, asked the way a user would, at chat's defaults.
    question = card["replies"][0]["question"]
    spot = checked(tailor("chat", "--library", str(library), "--adapter", name, "--prompt", question, "--seed", str(seed)),
                   f"chatting with {name}").stdout.strip()
    return {"candidate": candidate, "persona": persona, "seed": seed, "flags": CANDIDATES[candidate],
            "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "load": os.getloadavg()[0],
            **score(card), "spot_question": question, "spot_reply": spot,
            "replies": [{"q": r["question"], "persona": r["persona"], "style": r["persona_style"],
                         "loops": r["persona_loops"], "on_topic": r["persona_on_topic"]} for r in card["replies"]]}


def table(rows: list[dict]) -> str:
    lines = ["| candidate | dataset | train s (load) | good k/n | style k/n | loops k/n | on-topic k/n | knowledge (base) | held-out loss persona/base |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        n = row["prompts"]
        loss = (f"{row['persona_loss']:.2f}/{row['base_loss']:.2f}"
                if row["persona_loss"] is not None and row["base_loss"] is not None else "n/a")
        lines.append(f"| {row['candidate']} | {row['persona']} | {row['train_s']:.0f} ({row['load']:.1f}) | {row['good']}/{n} | "
                     f"{row['style']}/{n} | {row['loops']}/{n} | {row['on_topic']}/{n} | "
                     f"{row['knowledge']}/{row['questions']} ({row['base_knowledge']}) | {loss} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", default=["defaults"], choices=sorted(CANDIDATES))
    parser.add_argument("--datasets", nargs="+", default=["cowboy"], choices=sorted(PERSONAS))
    parser.add_argument("--runs", nargs="+", metavar="CANDIDATE:DATASET",
                        help="run exactly these pairs, in this order (instead of every candidate x dataset)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--library", type=Path, default=Path("/tmp/tailor-recipe-search/library"))
    parser.add_argument("--results", type=Path, default=Path("/tmp/tailor-recipe-search/results.jsonl"))
    parser.add_argument("--table-only", action="store_true", help="print the table of the results file and exit")
    args = parser.parse_args()

    args.results.parent.mkdir(parents=True, exist_ok=True)
    pairs = ([tuple(run.split(":", 1)) for run in args.runs] if args.runs
             else [(candidate, persona) for candidate in args.candidates for persona in args.datasets])
    unknown = [f"{c}:{p}" for c, p in pairs if c not in CANDIDATES or p not in PERSONAS]
    if unknown:
        parser.error(f"unknown candidate or dataset in {', '.join(unknown)}")
    if not args.table_only:
        for candidate, persona in pairs:
            try:
                row = run_one(args.library, candidate, persona, args.seed)
            except RuntimeError as exc:  # one broken candidate should not cost the rest of a long search
                print(f"{candidate} on {persona}: {exc}", file=sys.stderr, flush=True)
                continue
            with args.results.open("a", encoding="utf-8") as out:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(table([row]).splitlines()[-1], flush=True)
            print(f"  spot check: {row['spot_question']!r} -> {row['spot_reply'][:300]!r}", flush=True)
    lines = args.results.read_text(encoding="utf-8").splitlines() if args.results.exists() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
