"""Chat speed of the bundled SmolLM2 on this CPU at each precision chat can load the base in.

The reference is plain transformers generate() on the full-precision (fp32) base, the strongest standard way to run
this model on a CPU. The candidates are the 16-bit base (bf16) and the 4-bit NF4 base (bitsandbytes, fp32 compute),
which is what Tailor's chat used before "auto". Generation is greedy, with the KV cache, one conversation at a time,
as ChatSession runs it; tokens/s counts new tokens after a warm-up reply. Each precision runs in its own process and
the rounds alternate, to spread the noise of a shared machine over all of them. The numbers decide which 16-bit
format chat holds an unquantised base in on the CPU (`app.core.chat.generation_dtype`).

Measured on the 2-core AMX development machine (shared with other jobs, so one thread each at low priority;
`--rounds 3 --new-tokens 48`): fp32 8.0 tokens/s, bf16 8.3 (1.04x; 1.03-1.05x in every round), 4-bit 13.2 (1.65x).
bf16 gains 4%, inside the noise of a shared machine, and rounds every weight, so an unquantised base stays fp32 on
the CPU (app.core.precision measured bf16 2.09x slower for the 4-bit path's generation). The 4-bit base is faster
here but answers worse (a 135M model loses much of its quality in 4-bit), which is why 'auto' prefers unquantised.

    python bench/chat_precision.py [--rounds 2] [--new-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["Tell me about the sea and why sailors love it.", "How do I make rice fluffy?", "Why is the sky blue?"]
CANDIDATES = {"fp32": ("none", "float32"), "bf16": ("none", "bfloat16"), "4bit": ("4bit", "float32")}


def _tokens_per_second(name: str, new_tokens: int) -> float:
    import torch

    from app.core.models import load_model, load_tokenizer, resolve_base

    torch.set_num_threads(max(1, torch.get_num_threads()))
    quant, dtype_name = CANDIDATES[name]
    folder = resolve_base("default").folder
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, quant, "cpu", dtype=getattr(torch, dtype_name))
    model.config.use_cache = True
    model.eval()

    def generate(prompt: str) -> int:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        return output.shape[1] - inputs["input_ids"].shape[1]

    generate(PROMPTS[0])  # warm-up: first-call allocations, bitsandbytes' CPU repacking
    started, produced = time.perf_counter(), 0
    for prompt in PROMPTS:
        produced += generate(prompt)
    return produced / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--one", choices=sorted(CANDIDATES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_tokens_per_second(args.one, args.new_tokens)))
        return

    results: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for _ in range(args.rounds):
        for name in CANDIDATES:
            run = subprocess.run([sys.executable, __file__, "--one", name, "--new-tokens", str(args.new_tokens)],
                                 capture_output=True, text=True, check=True)
            results[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
    reference = statistics.median(results["fp32"])
    print(f"Chat generation, bundled SmolLM2-135M, greedy, {args.new_tokens} new tokens x {len(PROMPTS)} prompts, "
          f"{args.rounds} round(s)")
    print(f"{'precision':<10} {'tokens/s (median)':>18} {'vs fp32 transformers':>22}  all rounds")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<10} {median:>18.1f} {median / reference:>21.2f}x  {', '.join(f'{v:.1f}' for v in values)}")


if __name__ == "__main__":
    main()
