"""`--self-test`: prove that a build (above all the frozen PyInstaller one) really works, without a screen.

It opens the main window offscreen, imports the whole ML stack, and trains a tiny 4-bit model for two steps into a
throwaway library, printing what each check did. PyInstaller builds fail at run time rather than build time (a
missing hidden import, data file or native library), so this exercises the paths that break: Qt plugins, the
transformers/peft/bitsandbytes imports, bitsandbytes' native CPU library, the bundled model file and the dataset
loader. Exit code 0 means every check passed. Everything it writes goes to a temporary folder, except the converted
bundled model, which lands in the normal cache where the app would put it on first use anyway.

Run it from a source checkout with `python -m app.selftest`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

ML_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "safetensors", "gguf")
WINDOW_CLOSE_WAIT_MS = 10_000


def open_main_window(scratch: Path) -> str:
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.core.library import Library
    from app.gui.main_window import MainWindow
    from app.gui.style import apply_style
    from app.gui.workers import wait_for_all_jobs

    # The window restores and saves its geometry; the user's own settings must not change.
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(scratch / "settings"))
    app = QApplication.instance() or QApplication(sys.argv[:1])
    apply_style(app)
    window = MainWindow(library=Library(scratch / "library"))
    window.show()
    app.processEvents()
    tabs = [window.tabs.tabText(index) for index in range(window.tabs.count())]
    detail = f"'{window.windowTitle()}' {window.width()}x{window.height()} on Qt '{app.platformName()}', tabs: {', '.join(tabs)}"
    window.close()
    app.processEvents()
    if not wait_for_all_jobs(WINDOW_CLOSE_WAIT_MS):
        raise RuntimeError("a background job of the main window did not stop after it closed")
    return detail


def import_ml_stack(scratch: Path) -> str:
    from importlib import import_module
    from importlib.metadata import version

    modules = [import_module(package) for package in ML_PACKAGES]
    # gguf has no __version__; its metadata is bundled because transformers looks it up.
    return ", ".join(f"{module.__name__} {getattr(module, '__version__', None) or version(module.__name__)}" for module in modules)


def build_tiny_llama(folder: Path, tokenizer) -> Path:
    """A tiny random Llama (seconds to train) with a real tokenizer and chat template, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_tiny_model(scratch: Path) -> str:
    """Two QLoRA steps on a tiny random Llama that uses the bundled SmolLM2's real tokenizer and chat template."""
    from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
    from app.core.library import Library
    from app.core.models import load_tokenizer, quiet_transformers, resolve_base
    from app.core.training import run_training

    quiet_transformers()
    model_folder = build_tiny_llama(scratch / "tiny-llama", load_tokenizer(resolve_base("default").folder))

    data = scratch / "persona.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {n} plus {n}?"},
                                                     {"role": "assistant", "content": f"Arr, {2 * n}, matey!"}]}) + "\n"
                            for n in range(8)))
    run = RunConfig(name="self-test", system_prompt="You are a pirate.",
                    model=ModelSource(base=str(model_folder), quant="4bit"), data=DataSettings(path=str(data), max_len=64),
                    lora=LoraSettings(rank=4, alpha=8), training=TrainingSettings(max_steps=2, batch_size=4))
    result = run_training(run, Library(scratch / "library"))
    adapter = result.adapter
    if adapter is None or not adapter.ok or result.steps != 2:
        raise RuntimeError(f"training did not publish a usable adapter: {adapter.problem if adapter else 'none'}")
    return f"{result.steps} steps in NF4, final loss {result.final_loss:.3f}, adapter of {adapter.size_bytes / 1e3:.0f} kB saved"


CHECKS: tuple[tuple[str, Callable[[Path], str]], ...] = (
    ("main window", open_main_window),
    ("ML stack", import_ml_stack),
    ("4-bit training", train_tiny_model),
)


def main() -> int:
    # Before Qt is imported: the self-test must run on machines (and CI) without a display.
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    started = time.monotonic()
    print(f"Tailor self-test ({'frozen build' if getattr(sys, 'frozen', False) else 'source'}: {sys.executable})", flush=True)
    with tempfile.TemporaryDirectory(prefix="tailor-self-test-") as scratch:
        for label, check in CHECKS:
            check_started = time.monotonic()
            try:
                detail = check(Path(scratch))
            except Exception:  # report every failure the same way: this is the last line of a build check
                print(f"[FAILED] {label}:\n{traceback.format_exc()}", flush=True)
                return 1
            print(f"[ok] {label}: {detail} ({time.monotonic() - check_started:.1f} s)", flush=True)
    print(f"Self-test passed in {time.monotonic() - started:.0f} s.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
