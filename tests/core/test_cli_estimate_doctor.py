"""`tailor estimate` and `tailor doctor` through the real entry point: output and exit codes."""

from __future__ import annotations

import re
import sys

import pytest

from app.cli import EXIT_BAD_INPUT, EXIT_OK, main
from app.core.catalogue import ModelShape, find_entry
from app.core.estimate import estimate_training_memory


def total_line(output: str) -> float:
    match = re.search(r"^Total: (\d+\.\d\d) GB$", output, re.MULTILINE)
    assert match, output
    return float(match.group(1))


def test_estimate_default_prints_the_breakdown_and_total(capsys):
    assert main(["estimate"]) == EXIT_OK
    output = capsys.readouterr().out
    assert "SmolLM2 135M Instruct" in output
    # This machine has no CUDA; the bundled model loads from the fp32 folder Tailor converts its GGUF into.
    expected = estimate_training_memory(find_entry("smollm2-135m").shape, device="cpu", checkpoint_bytes=4)
    labels = dict(zip(expected.row_fields(), (label for label, _ in expected.rows())))
    for field in ("base_weights", "adapter_weights", "optimizer_states", "gradients", "activations", "runtime"):
        assert labels[field] in output
    # Which backward peak is larger depends on the compute dtype, which depends on this CPU (bf16 only with AMX).
    assert labels.get("logits", labels.get("block_backward")) in output
    file_label = labels.get("mapped_checkpoint") or labels.get("checkpoint_while_loading")
    assert file_label and file_label in output, "the model file is shown wherever it raises the peak"
    assert total_line(output) == round(expected.total_gb, 2)
    assert "Free now:" in output


def test_estimate_follows_the_flags(capsys):
    args = ["estimate", "--base", "Qwen/Qwen2.5-7B-Instruct", "--rank", "64", "--max-len", "1024",
            "--batch-size", "2", "--quant", "8bit", "--no-gradient-checkpointing"]
    assert main(args) == EXIT_OK
    output = capsys.readouterr().out
    expected = estimate_training_memory(find_entry("qwen2.5-7b").shape, quant="8bit", rank=64, max_len=1024,
                                        batch_size=2, gradient_checkpointing=False, device="cpu")
    assert total_line(output) == round(expected.total_gb, 2)
    assert f"{expected.lora_param_count:,} trainable" in output
    assert "gradient checkpointing off" in output


def test_estimate_checkpointing_every_other_block(capsys):
    args = ["estimate", "--base", "qwen2.5-7b", "--max-len", "1024", "--device", "cuda",
            "--checkpoint-every-n-layers", "2"]
    assert main(args) == EXIT_OK
    output = capsys.readouterr().out
    expected = estimate_training_memory(find_entry("qwen2.5-7b").shape, max_len=1024, device="cuda",
                                        checkpoint_every_n_layers=2)
    assert total_line(output) == round(expected.total_gb, 2)
    every_block = estimate_training_memory(find_entry("qwen2.5-7b").shape, max_len=1024, device="cuda")
    assert expected.total > every_block.total
    assert "gradient checkpointing on every other block" in output


def test_estimate_reads_a_local_model_folder(tmp_path, capsys):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True,
                max_position_embeddings=4096).save_pretrained(tmp_path)
    assert main(["estimate", "--base", str(tmp_path), "--max-len", "256"]) == EXIT_OK
    output = capsys.readouterr().out
    shape = ModelShape(architecture="qwen2", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=32000,
                       tie_word_embeddings=True, max_position_embeddings=4096)
    assert total_line(output) == round(estimate_training_memory(shape, max_len=256, device="cpu").total_gb, 2)
    assert tmp_path.name in output
    assert "rough guide" not in output


def test_estimate_warns_about_an_unknown_block_layout(tmp_path, capsys):
    from transformers import Qwen3Config

    Qwen3Config(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000).save_pretrained(tmp_path)
    assert main(["estimate", "--base", str(tmp_path)]) == EXIT_OK
    assert "'qwen3' block layout" in capsys.readouterr().out


def test_estimate_unknown_base_is_bad_input_listing_the_catalogue(capsys):
    assert main(["estimate", "--base", "not-a-model"]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "'not-a-model'" in error
    assert "smollm2-135m" in error and "phi3.5-mini" in error


def test_estimate_folder_without_config_is_bad_input(tmp_path, capsys):
    assert main(["estimate", "--base", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "config.json" in capsys.readouterr().err


def test_estimate_bad_numbers_and_choices_are_bad_input(capsys):
    assert main(["estimate", "--rank", "0"]) == EXIT_BAD_INPUT
    assert "at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses unknown choices itself, with the same code
        main(["estimate", "--quant", "2bit"])
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert "--quant" in capsys.readouterr().err


def test_doctor_reports_the_machine_in_plain_words(tmp_path, capsys):
    library = tmp_path / "my-library"
    assert main(["doctor", "--library", str(library)]) == EXIT_OK
    output = capsys.readouterr().out
    assert re.search(r"^Python 3\.\d+", output, re.MULTILINE)
    assert "PyTorch" in output and "CUDA is not available" in output
    assert re.search(r"^bitsandbytes \S+: 4-bit \(NF4\) quantisation works on the CPU\.$", output, re.MULTILINE)
    assert "No NVIDIA GPU found — training runs on the CPU" in output
    assert "System RAM:" in output
    assert "Bundled model: SmolLM2-135M-Instruct is installed" in output
    assert f"Library: {library} (created on first use)" in output


def test_doctor_reports_a_broken_4bit_path_instead_of_crashing(monkeypatch, capsys):
    import app.cli.doctor_cmd as doctor

    def broken(device):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(doctor, "check_4bit", broken)
    assert main(["doctor"]) == EXIT_OK
    assert "does NOT work on the CPU (RuntimeError: no kernel image is available)" in capsys.readouterr().out


def test_estimate_for_a_gpu_run_from_a_machine_without_one(capsys):
    args = ["estimate", "--base", "llama3.1-8b", "--max-len", "1024", "--batch-size", "1", "--device", "cuda"]
    assert main(args) == EXIT_OK
    output = capsys.readouterr().out
    assert "on the CUDA" in output and "CUDA context" in output and "Python and libraries" not in output
    expected = estimate_training_memory(find_entry("llama3.1-8b").shape, max_len=1024, batch_size=1, device="cuda")
    assert total_line(output) == round(expected.total_gb, 2)
    assert 6.0 <= total_line(output) < 8.0
    assert "No NVIDIA GPU on this machine to weigh it against" in output


def test_estimate_device_defaults_to_the_one_present_and_cpu_can_be_asked_for(capsys):
    assert main(["estimate", "--device", "cpu"]) == EXIT_OK
    explicit = capsys.readouterr().out
    assert main(["estimate"]) == EXIT_OK  # no CUDA here, so the CPU
    assert capsys.readouterr().out.splitlines()[:-1] == explicit.splitlines()[:-1]  # all but the live free memory
    assert "Python and libraries" in explicit and "on the CPU" in explicit
    with pytest.raises(SystemExit) as exit_info:
        main(["estimate", "--device", "tpu"])
    assert exit_info.value.code == EXIT_BAD_INPUT


def test_estimate_weighs_against_the_gpu_torch_would_use(monkeypatch, capsys):
    """Two cards (FakeNvml, since none is here); CUDA_VISIBLE_DEVICES names the second on the PCI bus by UUID."""
    from fake_nvml import RTX_3090, RTX_4070, FakeNvml

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([RTX_4070, RTX_3090]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-e0e1e2e3")
    assert main(["estimate", "--base", "llama3.1-8b", "--device", "cuda"]) == EXIT_OK
    output = capsys.readouterr().out
    free_gb = (RTX_3090["total"] - RTX_3090["used"]) / 1024**3
    assert f"Free now: {free_gb:.2f} GB on GPU 1 (NVIDIA GeForce RTX 3090)" in output
