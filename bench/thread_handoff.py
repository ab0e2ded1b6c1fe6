"""Does a reply generated in another thread than the one that loaded the model run at full speed?

Tailor loads a model in one thread and generates in another (`tailor chat`'s reply thread, the server's decode loop,
the app's chat worker); app.core.omp_pool releases the loading thread's OpenMP helpers so they do not slow the
generating thread down. Three ways to get the same greedy 60-token reply from the bundled SmolLM2 (unquantised),
each in its own process, three replies each:
  (a) reference: transformers' generate() in the thread that loaded the model (no hand-off at all)
  (b) Tailor's ChatSession.reply (generate() in its reply thread) with the release turned off
  (c) Tailor's ChatSession.reply as shipped

    python bench/thread_handoff.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MESSAGES = [{"role": "user", "content": "Tell me a long story about a ship."}]
CONFIGURATIONS = {"(a) generate() in the loading thread": "reference",
                  "(b) Tailor's reply thread, no release": "no-release",
                  "(c) Tailor's reply thread (shipped)": "shipped"}


def measure(mode: str) -> list[float]:
    import torch

    import app.core.omp_pool as omp_pool
    from app.core.chat import BASE, ChatSession, GenerationSettings

    if mode == "no-release":
        omp_pool.release_idle_pool = lambda: False
    session = ChatSession("default", "none")
    settings = GenerationSettings(temperature=0, max_new_tokens=60)
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        if mode == "reference":
            inputs = session.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                                           return_dict=True)
            with torch.inference_mode():
                session.base_model.generate(**inputs, max_new_tokens=60, min_new_tokens=60, do_sample=False)
        else:
            assert session.reply(MESSAGES, BASE, settings)  # generate() runs in ChatSession's reply thread
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2])))
        return
    results = {}
    for label, mode in CONFIGURATIONS.items():
        done = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
        results[label] = min(json.loads(done.stdout.strip().splitlines()[-1]))
    reference = results["(a) generate() in the loading thread"]
    print("SmolLM2-135M-Instruct, unquantised, greedy 60 tokens, best of 3 replies, each configuration in its own process")
    for label, seconds in results.items():
        print(f"{label:<44}{seconds:>7.2f} s{reference / seconds:>8.2f}x the reference's speed")


if __name__ == "__main__":
    main()
