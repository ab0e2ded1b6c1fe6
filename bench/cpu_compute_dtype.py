"""bf16 against fp32 compute on this CPU: 4-bit QLoRA training steps and chat generation of the bundled SmolLM2.

The reference is fp32, what Tailor used on every CPU before; the candidate is bf16 for both the model's own tensors
and bitsandbytes' 4-bit compute dtype (`bnb_4bit_compute_dtype`). bf16 can only win where the CPU multiplies bf16
natively (AMX tiles or AVX512-BF16); elsewhere PyTorch emulates it and it loses. Its chat numbers decide what
`app.core.precision.compute_dtype` picks for generation on the CPU; for training, Tailor's own trainer measured in
bench/trainer_levers.py decides (this file's hand-written training loop is a quick cross-check).

Training: the same real persona examples (the pirate dataset, chat template, batch of 4, gradient checkpointing, LoRA
r16 on all linears), forward through the decoder and the output head, backward, AdamW step. Chat: greedy generation
of new tokens after a warm-up, as ChatSession does. Each dtype runs in its own process, alternating, to spread the
noise of a shared machine across both.

    python bench/cpu_compute_dtype.py [--rounds 2] [--steps 4] [--new-tokens 48]
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

DATASET = REPO / "resources" / "datasets" / "pirate.jsonl"
BATCH, MAX_LEN, RANK = 4, 256, 16
PROMPT = [{"role": "user", "content": "Tell me about the sea and why sailors love it."}]


def _load(dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM

    from app.core.models import load_tokenizer, quantization_config, quiet_transformers, resolve_base

    quiet_transformers()
    dtype = getattr(torch, dtype_name)
    folder = resolve_base("default").folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quantization_config("4bit", dtype),
                                                 device_map={"": "cpu"})
    return model, load_tokenizer(folder)


def _train_seconds_per_step(dtype_name: str, steps: int) -> float:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from app.core.data import IGNORE_INDEX, load_dataset_file, tokenize_dataset

    model, tokenizer = _load(dtype_name)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    examples, _ = tokenize_dataset(tokenizer, load_dataset_file(str(DATASET)), MAX_LEN, None)
    model.train()
    durations = []
    for step in range(steps + 1):  # the first step repacks and warms up; it is not counted
        rows = examples[step * BATCH:(step + 1) * BATCH]
        width = max(len(example.input_ids) for example in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), IGNORE_INDEX)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, example in enumerate(rows):
            ids[row, :len(example.input_ids)] = torch.tensor(example.input_ids)
            labels[row, :len(example.labels)] = torch.tensor(example.labels)
            mask[row, :len(example.input_ids)] = 1
        started = time.perf_counter()
        base = model.get_base_model()
        hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        selected = labels[:, 1:] != IGNORE_INDEX
        logits = base.get_output_embeddings()(hidden[:, :-1][selected]).float()
        F.cross_entropy(logits, labels[:, 1:][selected]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def _chat_tokens_per_s(dtype_name: str, new_tokens: int) -> float:
    import torch

    from app.core import skinny_linear

    model, tokenizer = _load(dtype_name)
    model.eval()
    skinny_linear.install_where_it_pays(model, "cpu")  # as ChatSession does (fp32 layers only: the LM head here)
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    options = dict(**inputs, do_sample=False, temperature=None, top_p=None, top_k=None,
                   pad_token_id=tokenizer.pad_token_id, min_new_tokens=new_tokens)
    with torch.inference_mode():
        model.generate(**options, max_new_tokens=4)  # warm-up: bitsandbytes repacks its 4-bit weights once
        started = time.perf_counter()
        output = model.generate(**options, max_new_tokens=new_tokens)
        elapsed = time.perf_counter() - started
    return (output.shape[1] - inputs["input_ids"].shape[1]) / elapsed


def _child(args) -> None:
    result = {"train_s_per_step": _train_seconds_per_step(args.dtype, args.steps),
              "chat_tokens_per_s": _chat_tokens_per_s(args.dtype, args.new_tokens)}
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.dtype:
        _child(args)
        return 0

    from app.core.precision import cpu_bf16_flags

    results: dict[str, list[dict]] = {"float32": [], "bfloat16": []}
    for _ in range(args.rounds):
        for dtype in results:
            command = [sys.executable, __file__, "--dtype", dtype, "--steps", str(args.steps),
                       "--new-tokens", str(args.new_tokens)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[dtype].append(json.loads(output.strip().splitlines()[-1]))

    def median(dtype: str, key: str) -> float:
        return statistics.median(run[key] for run in results[dtype])

    print(f"CPU bf16 features: {', '.join(sorted(cpu_bf16_flags())) or 'none'}")
    print(f"SmolLM2-135M 4-bit NF4, LoRA r{RANK}, batch {BATCH} x <= {MAX_LEN} tokens, {args.rounds} rounds (medians)")
    print(f"{'':28}{'fp32 (reference)':>18}{'bf16':>12}{'bf16 / fp32':>14}")
    train32, train16 = median("float32", "train_s_per_step"), median("bfloat16", "train_s_per_step")
    chat32, chat16 = median("float32", "chat_tokens_per_s"), median("bfloat16", "chat_tokens_per_s")
    print(f"{'training, s per step':28}{train32:>18.2f}{train16:>12.2f}{train16 / train32:>13.2f}x")
    print(f"{'chat, new tokens per s':28}{chat32:>18.1f}{chat16:>12.1f}{chat16 / chat32:>13.2f}x")
    print("(training: lower is faster; chat: higher is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
