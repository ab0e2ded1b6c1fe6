"""Soak: 500 chat turns across several personas on the real SmolLM2-135M, looking for slow leaks.

One ChatSession (what the app, the CLI and the server use) with four persona adapters loaded; each turn picks the
next persona (or the plain base), sends the persona's running conversation (the last few turns, so prompts vary in
length like a real chat) and streams a short reply. After a warm-up of WARMUP turns it checks:
  - resident memory (RSS) grows by at most 5 % from the end of the warm-up to the last turn;
  - open file descriptors and threads are back at their warm-up count (no leaked streamer threads or files);
  - latency stays flat: p95 of the last 100 turns is at most 1.25x the p95 of the first 100 after warm-up.
The reference, measured in the same run, is plain transformers `generate` on the same model and prompt length
without Tailor's session (no streamer thread, no persona switch): its p95 and Tailor's p95 are printed as a ratio.

    flock /tmp/tailor-heavy.lock python bench/soak.py [--turns 500] [--max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the adapter factory the tests use

PERSONAS = {"pirate": "You are a pirate.", "butler": "You are a formal butler.", "poet": "You answer in haiku.",
            "coach": "You are an upbeat fitness coach."}
QUESTIONS = ["Hello!", "What is the sun?", "Any tip for sleep?", "Tell me about cats.", "What is rain?",
             "How do I boil an egg?", "Name a planet.", "Why is the sky blue?"]
WARMUP = 50
WINDOW = 100
RSS_GROWTH_LIMIT = 0.05
P95_GROWTH_LIMIT = 1.25
HISTORY_TURNS = 3


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def resources() -> dict[str, float]:
    import psutil

    gc.collect()
    process = psutil.Process()
    return {"rss_mb": process.memory_info().rss / 1e6, "fds": process.num_fds(), "threads": threading.active_count(),
            "os_threads": process.num_threads()}


def reference_p95(session, turns: int, max_new_tokens: int) -> float:
    """Plain transformers generate on the same base and the same kind of prompt: the floor Tailor's turn sits on."""
    import torch

    timings = []
    for turn in range(turns):
        messages = [{"role": "system", "content": "You are a pirate."},
                    {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}]
        inputs = session.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                       return_dict=True)
        started = time.perf_counter()
        with torch.inference_mode():
            session.base_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=session.tokenizer.pad_token_id)
        timings.append(time.perf_counter() - started)
    return p95(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--max-new-tokens", type=int, default=8, help="short replies keep the run bounded")
    args = parser.parse_args()
    assert args.turns >= WARMUP + 2 * WINDOW, f"need at least {WARMUP + 2 * WINDOW} turns"

    import torch
    from adapter_factory import make_random_adapters

    from app.core.chat import BASE, ChatSession, GenerationSettings
    from app.core.library import Library
    from app.core.models import resolve_base

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    base = resolve_base("default")
    with tempfile.TemporaryDirectory(prefix="tailor-soak-") as folder:
        library = Library(Path(folder) / "library")
        for seed, (name, prompt) in enumerate(PERSONAS.items()):
            make_random_adapters(library, base.folder, [name], rank=8, system_prompt=prompt, seed=seed)
        session = ChatSession("default", quant="none")
        for name in PERSONAS:
            session.load_adapter(library.get_usable(name))
        choices = [BASE, *PERSONAS]
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, seed=0)
        histories: dict[str, list[dict[str, str]]] = {choice: [] for choice in choices}

        latencies: list[float] = []
        warm = None
        started_all = time.perf_counter()
        for turn in range(args.turns):
            choice = choices[turn % len(choices)]
            history = histories[choice]
            history.append({"role": "user", "content": QUESTIONS[(turn // len(choices)) % len(QUESTIONS)]})
            messages = session.prompt_messages(history, session.system_prompt(choice))
            started = time.perf_counter()
            reply = session.reply(messages, choice, settings)
            latencies.append(time.perf_counter() - started)
            history.append({"role": "assistant", "content": reply})
            del history[: max(0, len(history) - 2 * HISTORY_TURNS)]
            if turn + 1 == WARMUP:
                warm = resources()
            if (turn + 1) % 100 == 0:
                print(f"  turn {turn + 1}: p95 so far {p95(latencies[-100:]) * 1000:.0f} ms, {resources()}", flush=True)
        elapsed = time.perf_counter() - started_all
        end = resources()
        reference = reference_p95(session, 50, args.max_new_tokens)

    measured = latencies[WARMUP:]
    first, last = p95(measured[:WINDOW]), p95(measured[-WINDOW:])
    rss_growth = (end["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"]
    checks = {
        f"RSS growth after warm-up <= {RSS_GROWTH_LIMIT:.0%}": rss_growth <= RSS_GROWTH_LIMIT,
        "file descriptors back at the warm-up count": end["fds"] <= warm["fds"],
        "Python threads back at the warm-up count": end["threads"] <= warm["threads"],
        "OS threads back at the warm-up count": end["os_threads"] <= warm["os_threads"],
        f"p95 last {WINDOW} / first {WINDOW} <= {P95_GROWTH_LIMIT}": last / first <= P95_GROWTH_LIMIT,
    }
    print(f"\nSoak: {args.turns} turns over {len(choices)} personas (base + {len(PERSONAS)} adapters), "
          f"{args.max_new_tokens} new tokens each, {elapsed:.0f} s")
    print(f"  RSS: {warm['rss_mb']:.0f} MB after {WARMUP} warm-up turns -> {end['rss_mb']:.0f} MB at the end "
          f"({rss_growth:+.1%})")
    print(f"  file descriptors: {warm['fds']} -> {end['fds']}; Python threads: {warm['threads']} -> {end['threads']}; "
          f"OS threads: {warm['os_threads']} -> {end['os_threads']}")
    print(f"  latency p95: first {WINDOW} {first * 1000:.0f} ms, last {WINDOW} {last * 1000:.0f} ms "
          f"(ratio {last / first:.2f}); median {statistics.median(measured) * 1000:.0f} ms")
    print(f"  reference (plain transformers generate, same model, greedy, no session): p95 {reference * 1000:.0f} ms; "
          f"Tailor turn p95 / reference p95 = {statistics.fmean([first, last]) / reference:.2f}")
    for check, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAIL'}] {check}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
