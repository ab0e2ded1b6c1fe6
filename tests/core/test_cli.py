"""The `tailor` command line as users and scripts call it: real processes, real files, exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main


def tailor(*args: str, home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TAILOR_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_console_script_is_installed():
    assert (Path(sys.executable).parent / "tailor").is_file(), "pip install should provide the `tailor` command"


def test_bad_input_exits_2_without_traceback(tmp_path, chat_jsonl):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    cases = [
        ("train", "--data", str(tmp_path / "missing.jsonl")),
        ("data", "check", str(bad)),
        ("train", "--data", str(chat_jsonl), "--rank", "0"),
        ("train", "--data", str(chat_jsonl), "--base", str(tmp_path / "nowhere.gguf")),
        ("chat", "--adapter", "nobody", "--prompt", "hi"),
        ("adapters", "show", "nobody"),
        ("train", "--data", str(chat_jsonl), "--quant", "3bit"),
    ]
    for args in cases:
        result = tailor(*args, home=tmp_path / "lib")
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.strip(), args
    result = tailor("data", "check", str(bad), home=tmp_path / "lib")
    assert "bad.jsonl line 2: not valid JSON" in result.stderr


def test_offline_hub_download_is_a_clear_error_and_leaves_no_run(chat_jsonl, library_root, capsys):
    assert main(["train", "--data", str(chat_jsonl), "--base", "someone/some-model", "--name", "x"]) == 2
    assert "appears to be offline" in capsys.readouterr().err
    from app.core.library import Library

    assert Library(library_root).interrupted_runs() == [], "a run that never started must not be offered for resume"


def test_unexpected_errors_exit_1_and_traceback_only_with_debug(tmp_path, monkeypatch, capsys):
    import app.cli.adapters_cmd as adapters_cmd

    def explode(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(adapters_cmd, "list_adapters", explode)
    monkeypatch.setenv("TAILOR_HOME", str(tmp_path))
    assert main(["adapters", "list"]) == 1
    err = capsys.readouterr().err
    assert "unexpected error: RuntimeError: boom" in err and "Traceback" not in err
    assert main(["adapters", "list", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_library_flag_beats_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TAILOR_HOME", str(tmp_path / "env"))
    assert main(["adapters", "list", "--library", str(tmp_path / "flag")]) == 0
    assert str(tmp_path / "flag") in capsys.readouterr().out


@pytest.mark.slow
def test_train_chat_and_manage_with_the_real_bundled_model(tmp_path, smollm2_folder):
    """End to end on SmolLM2-135M in 4-bit: train, chat, list, show, rename, delete, data check."""
    home = tmp_path / "lib"
    data = Path(__file__).resolve().parents[2] / "resources" / "datasets" / "pirate.jsonl"
    result = tailor("train", "--data", str(data), "--name", "pirate", "--system", "You are a pirate.",
                    "--max-steps", "3", "--batch-size", "4", "--max-len", "256", "--lr", "1e-3", home=home)
    assert result.returncode == 0, result.stderr
    assert "Saved adapter 'pirate'" in result.stdout

    assert_loads_in_plain_peft_and_changes_logits(home / "adapters" / "pirate", smollm2_folder)

    greedy = ("chat", "--adapter", "pirate", "--prompt", "Hello!", "--max-new-tokens", "12", "--temperature", "0")
    reply = tailor(*greedy, home=home)
    assert reply.returncode == 0 and reply.stdout.strip(), reply.stderr
    assert tailor(*greedy, home=home).stdout == reply.stdout, "greedy replies are repeatable"

    listing = tailor("adapters", "list", home=home)
    assert "pirate" in listing.stdout and "ok" in listing.stdout
    assert tailor("adapters", "rename", "pirate", "captain", home=home).returncode == 0
    shown = tailor("adapters", "show", "captain", home=home)
    assert '"name": "captain"' in shown.stdout and "You are a pirate." in shown.stdout
    assert tailor("adapters", "delete", "captain", home=home).returncode == 0
    assert "No adapters yet" in tailor("adapters", "list", home=home).stdout
    assert len(list((home / "trash").iterdir())) == 1

    report = tailor("data", "check", str(data), home=home)
    assert report.returncode == 0 and "Format: openai" in report.stdout and "Rows: 160" in report.stdout


def assert_loads_in_plain_peft_and_changes_logits(adapter: Path, base_folder: Path) -> None:
    """What someone without Tailor would do with the adapter folder: plain transformers + peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "How are you today?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
        tuned_logits = tuned(**inputs).logits
    assert (tuned_logits - base_logits).abs().max() > 0.1, "the trained adapter must change the model's output"
