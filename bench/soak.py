"""Soak: 500 chat turns and 500 server requests across several personas on the real SmolLM2-135M: slow leaks?

One ChatSession (what the app, the CLI and the server use) with four persona adapters loaded; each turn picks the
next persona (or the plain base), sends the persona's running conversation (the last few turns, so prompts vary in
length like a real chat) and streams a short reply. After a warm-up of WARMUP turns it checks:
  - resident memory (RSS) grows by at most 5 % from the end of the warm-up to the last turn;
  - open file descriptors and threads are back at their warm-up count (no leaked streamer threads or files);
  - latency stays flat: p95 of the last 100 turns is at most 1.25x the p95 of the first 100 after warm-up.
Then the same session is served by `tailor serve`'s app (a real uvicorn server on 127.0.0.1) and a client sends
500 chat-completion requests over HTTP with the same checks (the client's own threads and sockets are counted too).
The reference, measured in the same run, is plain transformers `generate` on the same model and prompt length
without Tailor's session (no streamer thread, no persona switch): its p95 and Tailor's p95 are printed as a ratio.

    flock /tmp/tailor-heavy.lock python bench/soak.py [--turns 500] [--requests 500] [--max-new-tokens 8]
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
    for turn in range(-1, turns):  # turn -1 warms the plain path up and is not timed
        messages = [{"role": "system", "content": "You are a pirate."},
                    {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}]
        inputs = session.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                       return_dict=True)
        started = time.perf_counter()
        with torch.inference_mode():
            session.base_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=session.tokenizer.pad_token_id)
        if turn >= 0:
            timings.append(time.perf_counter() - started)
    return p95(timings)


def check(label: str, latencies: list[float], warm: dict, end: dict, reference: float) -> dict[str, bool]:
    """Print one phase's numbers and return its checks."""
    measured = latencies[WARMUP:]
    first, last = p95(measured[:WINDOW]), p95(measured[-WINDOW:])
    rss_growth = (end["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"]
    print(f"  {label}: RSS {warm['rss_mb']:.0f} MB after {WARMUP} warm-up -> {end['rss_mb']:.0f} MB ({rss_growth:+.1%}); "
          f"fds {warm['fds']} -> {end['fds']}; Python threads {warm['threads']} -> {end['threads']}; "
          f"OS threads {warm['os_threads']} -> {end['os_threads']}")
    print(f"  {label}: latency p95 first {WINDOW} {first * 1000:.0f} ms, last {WINDOW} {last * 1000:.0f} ms "
          f"(ratio {last / first:.2f}), median {statistics.median(measured) * 1000:.0f} ms; "
          f"p95 / reference p95 = {statistics.fmean([first, last]) / reference:.2f}")
    return {
        f"{label}: RSS growth after warm-up <= {RSS_GROWTH_LIMIT:.0%}": rss_growth <= RSS_GROWTH_LIMIT,
        f"{label}: file descriptors back at the warm-up count": end["fds"] <= warm["fds"],
        f"{label}: Python threads back at the warm-up count": end["threads"] <= warm["threads"],
        f"{label}: OS threads back at the warm-up count": end["os_threads"] <= warm["os_threads"],
        f"{label}: p95 last {WINDOW} / first {WINDOW} <= {P95_GROWTH_LIMIT}": last / first <= P95_GROWTH_LIMIT,
    }


def serve_phase(session, library, requests: int, max_new_tokens: int, names: list[str]) -> tuple[list[float], dict, dict]:
    """500 requests to a real `tailor serve` server sharing the session: per-request latency and resources."""
    import httpx

    from app.core.serving import ServingEngine
    from app.server.app import create_app
    from app.server.runner import ServerThread, bind

    engine = ServingEngine(session, library)
    engine.load_available()
    engine.start()
    server = ServerThread(create_app(engine), bind("127.0.0.1", 0)).start()
    latencies, warm = [], None
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for index in range(requests):
                body = {"model": names[index % len(names)], "max_tokens": max_new_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]}
                started = time.perf_counter()
                response = client.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                if index + 1 == WARMUP:
                    warm = resources()
                if (index + 1) % 100 == 0:
                    print(f"  request {index + 1}: p95 so far {p95(latencies[-100:]) * 1000:.0f} ms, {resources()}",
                          flush=True)
            end = resources()
    finally:
        server.stop()
        engine.close()
    return latencies, warm, end


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--requests", type=int, default=500, help="server requests after the chat turns (0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="short replies keep the run bounded")
    parser.add_argument("--base", default="default", help="base model (default: the bundled SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    for count in (args.turns, args.requests or WARMUP + 2 * WINDOW):
        if count < WARMUP + 2 * WINDOW:
            parser.error(f"--turns and --requests need at least {WARMUP + 2 * WINDOW} (warm-up plus two windows)")

    import torch
    from adapter_factory import make_random_adapters

    from app.core.chat import BASE, ChatSession, GenerationSettings
    from app.core.library import Library
    from app.core.models import resolve_base

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    base = resolve_base(args.base)
    with tempfile.TemporaryDirectory(prefix="tailor-soak-") as folder:
        library = Library(Path(folder) / "library")
        for seed, (name, prompt) in enumerate(PERSONAS.items()):
            make_random_adapters(library, base.folder, [name], rank=8, system_prompt=prompt, seed=seed)
        session = ChatSession(args.base, quant="none")
        for name in PERSONAS:
            session.load_adapter(library.get_usable(name))
        choices = [BASE, *PERSONAS]
        # Greedy, like the reference, so the ratio is about Tailor's session and not about sampling.
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0)
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
        served = serve_phase(session, library, args.requests, args.max_new_tokens, choices) if args.requests else None

    print(f"\nSoak: {args.turns} chat turns over {len(choices)} personas (base + {len(PERSONAS)} adapters), "
          f"{args.max_new_tokens} new tokens each, {elapsed:.0f} s; then {args.requests} server requests")
    print(f"  reference (plain transformers generate, same model, greedy, no session): p95 {reference * 1000:.0f} ms")
    checks = check("chat", latencies, warm, end, reference)
    if served:
        checks |= check("server", *served, reference)
    for check_name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAIL'}] {check_name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
