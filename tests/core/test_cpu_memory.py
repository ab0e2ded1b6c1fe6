"""Freed tensors go back to the OS on Linux once return_freed_memory_to_os() ran: measured in fresh processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Freeing a 16 MiB block raises glibc's dynamic mmap threshold to 16 MiB; then 60 blocks of 8 MiB come from the
# heap. All but the last are freed: on the heap they stay resident (the last one pins the top), on mmap they are returned.
PROGRAM = """
import sys, psutil, torch
from app.core.cpu_memory import return_freed_memory_to_os
pinned = return_freed_memory_to_os() if sys.argv[1] == "pin" else None
anonymous = lambda: (lambda info: info.rss - info.shared)(psutil.Process().memory_info())
big = torch.ones(16 * 2**20, dtype=torch.uint8); del big
before = anonymous()
blocks = [torch.ones(8 * 2**20, dtype=torch.uint8) for _ in range(60)]
del blocks[:-1]
print(pinned, (anonymous() - before) // 2**20)
"""


def retained_mib(mode: str) -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, cwd=REPO,
                            check=True, timeout=120)
    pinned, retained = result.stdout.split()
    return pinned, int(retained)


def test_freed_blocks_are_returned_only_with_the_threshold_pinned():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc is Linux's")
    _, default = retained_mib("default")
    pinned, with_helper = retained_mib("pin")
    assert pinned == "True"
    assert default >= 300, f"glibc kept only {default} MiB; the fragmentation this guards against did not happen"
    assert with_helper <= 40, f"{with_helper} MiB of freed blocks stayed resident"


def test_loading_a_model_on_the_cpu_pins_it(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc is Linux's")
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100)).save_pretrained(tmp_path)
    loading = f"from app.core.models import load_model; load_model({str(tmp_path)!r}, 'none', 'cpu')\n"
    program = PROGRAM.replace("pinned = return_freed_memory_to_os() if sys.argv[1] == \"pin\" else None\n",
                              loading + "pinned = True\n")
    result = subprocess.run([sys.executable, "-c", program, "load"], capture_output=True, text=True, cwd=REPO,
                            check=True, timeout=120)
    assert int(result.stdout.split()[1]) <= 40, result.stdout
