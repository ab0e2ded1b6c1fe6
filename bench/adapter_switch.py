"""How fast Tailor's chat switches persona, with 1, 5 and 20 adapters loaded on the real SmolLM2-135M in 4-bit.

Measured in one run, on one machine:
  - switch: making another loaded persona the active one (ChatSession.select), median over many switches;
  - peft set_adapter: the same switch through peft's own API (flips requires_grad on every adapter's matrices, so
    its cost grows with the number loaded);
  - peft load/unload: the reference without multi-adapter support: load the next adapter from disk, activate it,
    delete the previous one (PeftModel.load_adapter / set_adapter / delete_adapter);
  - first token: from asking for a reply to the first piece of text arriving (what a user waits for), greedy, with
    a short chat prompt, after a switch.

The adapters are random-initialised LoRA weights (rank 16 on every linear layer, like a default Tailor run) saved
with peft: switching cost does not depend on what the weights say.

    python bench/adapter_switch.py [--switches 60] [--replies 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the adapter factory the tests use

COUNTS = (1, 5, 20)
RANK = 16
SWITCH_TARGET_MS = 20.0
GROWTH_TARGET = 2.0
FIRST_TOKEN_TARGET_S = 0.5
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def median_ms(action, repeats: int) -> float:
    timings = []
    for index in range(repeats):
        started = time.perf_counter()
        action(index)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def first_piece_s(session, choice: str, settings) -> float:
    started = time.perf_counter()
    stream = session.stream(PROMPT, choice, settings)
    next(stream)
    elapsed = time.perf_counter() - started
    stream.close()  # stops generation after the first piece
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=60, help="switches timed per row")
    parser.add_argument("--replies", type=int, default=5, help="first-token timings per row")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from adapter_factory import make_random_adapters
    from peft import PeftModel

    from app.core.chat import BASE, ChatSession, GenerationSettings
    from app.core.library import Library
    from app.core.models import load_model, resolve_base

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {torch.cuda.is_available()}")
    base = resolve_base("default")
    library = Library(tempfile.mkdtemp(prefix="tailor-bench-"))
    print(f"Making {max(COUNTS)} random-initialised rank-{RANK} LoRA adapters (all linear layers) with peft…")
    entries = make_random_adapters(library, base.folder, [f"persona-{i:02d}" for i in range(max(COUNTS))], rank=RANK,
                                   target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    print(f"Loading {base.model_id} in 4-bit twice: Tailor's session and a plain peft reference…")
    session = ChatSession("default", "4bit")
    reference = PeftModel.from_pretrained(load_model(base.folder, "4bit"), str(entries[0].path), adapter_name="current").eval()
    settings = GenerationSettings(max_new_tokens=16)
    first_piece_s(session, BASE, settings)  # warm-up: bitsandbytes repacks 4-bit weights on the first pass

    rows = []
    for count in COUNTS:
        for entry in entries[len(session.adapters):count]:
            session.load_adapter(entry)
        names = list(session.adapters)

        # With one adapter loaded, "switching" alternates between it and the bare base.
        cycle = names if count > 1 else [names[0], BASE]

        def switch(index: int) -> None:
            session.select(cycle[index % len(cycle)])

        def peft_switch(index: int) -> None:
            session.peft_model.set_adapter(session.adapter_key(names[index % count]))

        def reload(index: int) -> None:
            old, new = ("current", "next") if index % 2 == 0 else ("next", "current")
            reference.load_adapter(str(entries[(index + 1) % count].path), adapter_name=new)
            reference.set_adapter(new)
            reference.delete_adapter(old)

        switch_ms = median_ms(switch, args.switches)
        peft_ms = median_ms(peft_switch, max(10, args.switches // 3))
        reload_ms = median_ms(reload, 6)
        first = statistics.median(first_piece_s(session, names[i % count], settings) for i in range(args.replies))
        rows.append((count, switch_ms, peft_ms, reload_ms, first))
        print(f"  {count:2d} adapters loaded: measured", flush=True)

    print()
    print(f"Persona switching on {base.model_id} (4-bit, CPU), random rank-{RANK} adapters")
    header = (f"{'loaded':>6} | {'Tailor switch':>13} | {'peft set_adapter':>16} | {'peft load/unload':>16} | "
              f"{'speed-up':>8} | {'vs 1 loaded':>11} | {'first token':>11}")
    print(header)
    print("-" * len(header))
    one = rows[0][1]
    for count, switch_ms, peft_ms, reload_ms, first in rows:
        print(f"{count:>6} | {switch_ms:>10.3f} ms | {peft_ms:>13.2f} ms | {reload_ms:>13.1f} ms | "
              f"{reload_ms / switch_ms:>7.0f}x | {switch_ms / one:>10.2f}x | {first:>9.3f} s")
    print()
    worst_switch = max(row[1] for row in rows)
    growth = rows[-1][1] / one
    worst_first = max(row[4] for row in rows)
    checks = [
        (f"switch <= {SWITCH_TARGET_MS:g} ms (worst {worst_switch:.3f} ms)", worst_switch <= SWITCH_TARGET_MS),
        (f"switch grows <= {GROWTH_TARGET:g}x from 1 to {COUNTS[-1]} adapters ({growth:.2f}x)", growth <= GROWTH_TARGET),
        (f"first token <= {FIRST_TOKEN_TARGET_S:g} s (worst {worst_first:.3f} s)", worst_first <= FIRST_TOKEN_TARGET_S),
    ]
    for text, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {text}")
    return 0 if all(passed for _, passed in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
