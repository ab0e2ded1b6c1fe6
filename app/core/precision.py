"""Which number format a run computes in, and what counts as running out of memory.

Three things every training and chat path needs to agree on:

- `compute_dtype(device)`: the dtype of activations and of bitsandbytes' 4-bit compute (`bnb_4bit_compute_dtype`).
  On CUDA bf16 only where the GPU multiplies it natively (compute capability 8.0, Ampere, and newer). On Turing and
  Pascal `torch.cuda.is_bf16_supported()` still answers yes, because bf16 can be *emulated* there, many times slower,
  so it is not asked; those GPUs get fp16, whose narrow range needs autocast and a GradScaler (the returned
  `needs_grad_scaler`). On the CPU bf16 only where the CPU multiplies bf16 natively and bf16 measured clearly
  faster for the workload on that kind of unit (BF16_TIME, BF16_WIN_RATIO): on an AMX Xeon training steps did
  (0.86x fp32's time) and chat generation did not (2.09x); on an AMD EPYC with AVX512-BF16 and no AMX training did
  (0.60x) and chat barely (0.94x once fp32 decoding took its fast path, app.core.skinny_linear). Training computes
  in bf16 on both, chat in fp32.
- `is_out_of_memory(exc)`: an allocation failure, whatever shape it arrives in. torch raises `torch.OutOfMemoryError`
  for its caching allocator, but cuBLAS, bitsandbytes' CUDA kernels and the CPU allocator report the same event as a
  plain RuntimeError with a message, and Python's own allocator as MemoryError. All of them mean "the settings need
  less memory", never "a bug in Tailor".
- `simulated_oom_steps()` / `raise_simulated_oom(step)`: the test seam `TAILOR_SIMULATE_OOM_AT=STEP[,STEP]` raises the
  real `torch.OutOfMemoryError` at those optimizer steps, so OOM recovery can be watched on any machine.

torch is imported inside the functions, so importing this module stays free.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from app.core.errors import TailorError

NATIVE_BF16_CAPABILITY = (8, 0)
"""Ampere (A100, RTX 30xx) and newer have bf16 tensor cores; older GPUs only emulate bf16."""

SIMULATE_OOM_ENV = "TAILOR_SIMULATE_OOM_AT"
"""Test seam: comma-separated optimizer steps (1-based, as in training_log.json) at which to raise a real OOM."""
SIMULATED_OOM_MESSAGE = "Simulated out of memory at step {step} ({env} is set)."

TRAINING, GENERATION = "training", "generation"
WORKLOADS = (TRAINING, GENERATION)
"""Training steps (large matmuls over whole batches) and chat generation (one token at a time) favour different
dtypes on a CPU."""
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of native bf16 arithmetic, strongest first: AMX tiles (Sapphire Rapids and newer) and
AVX512-BF16 dot products (Cooper Lake, Zen 4)."""
UNIT_NAMES = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}
BF16_TIME = {
    "amx_bf16": {TRAINING: 0.86, GENERATION: 2.09},
    "avx512_bf16": {TRAINING: 0.60, GENERATION: 0.94},
}
"""bf16 time / fp32 time, by the CPU's strongest native bf16 unit (cpu_bf16_unit), on 2-core machines.

amx_bf16, a Xeon with AMX tiles and AVX512-BF16 (2026-11-29). TRAINING: seconds per optimizer step of Tailor's own
trainer on the bundled SmolLM2-135M (cowboy persona, batch 8, LoRA r16 on all linears, dropout 0, no gradient
checkpointing; 5 steps after a warm-up step, each configuration in its own process): 4-bit base 5.33 s in bf16
against 6.43 s in fp32, and again 5.61 s against 6.78 s (0.83); 16-bit base 5.48 s against 6.09 s (0.90). Holding
fp32 weights under bf16 autocast instead was no better for the 4-bit base (6.63 s) and kept twice the weight memory
of a 16-bit base, so the weights themselves are bf16. GENERATION: one-token forward passes of a 4-bit linear
(576 -> 1536), 29.7 ms against 14.2 ms: decoding one token is too small for AMX tiles to pay.

avx512_bf16 without AMX, an AMD EPYC (Zen 4) (2026-12-04). TRAINING: bench/trainer_levers.py, the same trainer and
persona on the 16-bit base (Tailor's defaults), 2.30 s per step in bf16 against 3.83 s in fp32 (0.60), at 2388 MiB
peak RSS against 3591; bench/cpu_compute_dtype.py's 4-bit loop agrees (6.00 s against 8.07 s, 0.74). GENERATION:
bench/cpu_compute_dtype.py, greedy chat of the 4-bit SmolLM2, 35.8 new tokens/s in bf16 against 33.8 in fp32
(0.94). Zen 4 runs AVX512-BF16 dot products at full width, so even one-token steps gain a little; before fp32's LM
head decoded through W·xᵀ (app.core.skinny_linear) fp32 made 26.6 tokens/s, and bf16 looked like 0.83x.

A CPU with neither unit emulates bf16 and is never given it. bench/trainer_levers.py repeats the training
comparison, bench/cpu_compute_dtype.py the chat one."""
BF16_WIN_RATIO = {TRAINING: 0.9, GENERATION: 0.7}
"""bf16 is chosen for a workload only where it took at most this share of fp32's time. Training: a clear win, not
noise. Generation asks for more, because bf16 costs it reproducibility: a reply decoded in a batch (the server, the
report card) rounds differently in bf16 from the same reply decoded alone, and on Zen 4 greedy card replies then
differed from `tailor chat`'s, where in fp32 they are identical (tests/core/test_evaluation.py). 0.94x (or the
0.83x measured before) is not worth that; a larger win would be."""


class ComputePrecision(NamedTuple):
    """What a run computes in on one device."""

    dtype: Any
    """torch.bfloat16, torch.float16 or torch.float32: the model's dtype and bitsandbytes' 4-bit compute dtype."""
    needs_grad_scaler: bool
    """fp16 on CUDA: run forward under torch.autocast('cuda', torch.float16) and scale the loss with
    torch.amp.GradScaler, or small gradients underflow to zero. False for bf16 and fp32, which need neither."""
    reason: str
    """Plain words on why, for `tailor doctor` and logs."""


def cuda_precision(capability: tuple[int, int]) -> ComputePrecision:
    """bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 with autocast + GradScaler below."""
    import torch

    major, minor = capability
    if (major, minor) >= NATIVE_BF16_CAPABILITY:
        return ComputePrecision(torch.bfloat16, False, f"bf16: compute capability {major}.{minor} has bf16 tensor cores")
    return ComputePrecision(torch.float16, True,
                            f"fp16 with loss scaling: compute capability {major}.{minor} has no native bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The native-bf16 flags this CPU reports (Linux /proc/cpuinfo); empty where they cannot be read."""
    flags = {flag for value in _cpuinfo_values("flags", cpuinfo) for flag in value.split()}
    return frozenset(flags & set(CPU_BF16_FLAGS))


def cpu_vendor(cpuinfo: str | None = None) -> str | None:
    """The CPU's vendor id ('GenuineIntel', 'AuthenticAMD', ...): Linux /proc/cpuinfo, else what the OS names the
    processor (Windows includes the vendor id there); None where neither says."""
    import platform

    vendors = _cpuinfo_values("vendor_id", cpuinfo)
    if vendors:
        return vendors[0]
    return next((vendor for vendor in ("GenuineIntel", "AuthenticAMD") if vendor in platform.processor()), None)


def _cpuinfo_values(key: str, cpuinfo: str | None) -> list[str]:
    """The values of `key` in /proc/cpuinfo (or the text given), one per processor; none where it cannot be read
    (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    lines = (line.partition(":") for line in cpuinfo.splitlines())
    return [value.strip() for name, _, value in lines if name.strip() == key]


def cpu_bf16_unit(flags: frozenset[str]) -> str | None:
    """The strongest native bf16 unit among `flags`: AMX tiles over AVX512-BF16 alone; None without either."""
    return next((flag for flag in CPU_BF16_FLAGS if flag in flags), None)


def cpu_prefers_bf16(flags: frozenset[str] | None = None, workload: str = TRAINING) -> bool:
    """Whether bf16 measured clearly faster than fp32 for `workload` on a CPU with these flags (default: this one);
    needs no torch."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, not {workload!r}")
    unit = cpu_bf16_unit(cpu_bf16_flags() if flags is None else flags)
    return unit is not None and BF16_TIME[unit][workload] <= BF16_WIN_RATIO[workload]


def cpu_precision(flags: frozenset[str], workload: str = TRAINING) -> ComputePrecision:
    """bf16 where it measured clearly faster than fp32 on this kind of bf16 unit (BF16_TIME), fp32 everywhere else."""
    import torch

    unit = cpu_bf16_unit(flags)
    if unit is None:
        return ComputePrecision(torch.float32, False, "fp32: this CPU has no native bf16, where bf16 is emulated")
    ratio, name = BF16_TIME[unit][workload], UNIT_NAMES[unit]
    if cpu_prefers_bf16(flags, workload):
        return ComputePrecision(torch.bfloat16, False, f"bf16: {workload} measured {ratio:.2f}x fp32's time with {name}")
    return ComputePrecision(torch.float32, False, f"fp32: {workload} in bf16 measured {ratio:.2f}x fp32's time with "
                                                  f"{name}, short of the {BF16_WIN_RATIO[workload]}x that would pay")


def compute_dtype(device: str, workload: str = TRAINING) -> ComputePrecision:
    """The precision to compute in on `device` ('cuda', 'cuda:N' or 'cpu') for `workload` (TRAINING or GENERATION;
    they differ only on the CPU, where the measurements differ)."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index
        return cuda_precision(tuple(torch.cuda.get_device_capability(torch.cuda.current_device() if index is None
                                                                     else index)))
    return _cpu_precision_here(workload)


@functools.cache
def _cpu_precision_here(workload: str) -> ComputePrecision:
    return cpu_precision(cpu_bf16_flags(), workload)


# Out-of-memory recognition

# Message texts that mean an allocation failed, as the libraries word them (collected from their sources):
_OUT_OF_MEMORY_PATTERNS = re.compile("|".join((
    # torch's CUDA caching allocator: "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; ...)"; HIP and XPU
    # builds say "HIP out of memory." / "XPU out of memory." the same way (accelerate's should_reduce_batch_size).
    r"\b(CUDA|HIP|XPU) out of memory",
    # A CUDA runtime call that failed with cudaErrorMemoryAllocation, via C10_CUDA_CHECK: "CUDA error: out of memory".
    r"CUDA error: out of memory",
    # cuBLAS could not get its workspace: "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`".
    r"CUBLAS_STATUS_ALLOC_FAILED",
    # cuDNN: "cuDNN error: CUDNN_STATUS_ALLOC_FAILED" / "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE".
    r"CUDNN_STATUS_(ALLOC_FAILED|NOT_ENOUGH_WORKSPACE)",
    # bitsandbytes' CUDA kernels: "Error out of memory at line 88 in file /src/csrc/ops.cu" (cudaGetErrorString).
    r"Error out of memory at line \d+",
    # Apple's MPS backend: "MPS backend out of memory (MPS allocated: ...)".
    r"MPS backend out of memory",
    # torch's CPU allocator: "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate
    # memory: you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)"; Windows builds
    # say "DefaultCPUAllocator: not enough memory".
    r"DefaultCPUAllocator: (can't allocate memory|not enough memory)",
    # c10's generic allocation failure: "C10 Out of Memory. Trying to allocate ...".
    r"C10 Out of Memory",
)))


def is_out_of_memory(exc: BaseException) -> bool:
    """True when `exc` (or the exception it was raised from) reports that memory ran out, on the GPU or the CPU."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or _is_torch_out_of_memory(exc):
            return True
        if isinstance(exc, RuntimeError) and _OUT_OF_MEMORY_PATTERNS.search(str(exc)):
            return True
        # A wrapper (ours, or a library's) that re-raised the failure keeps it as its cause.
        exc = exc.__cause__ or exc.__context__
    return False


def _is_torch_out_of_memory(exc: BaseException) -> bool:
    import sys

    torch = sys.modules.get("torch")  # an exception from torch means torch is imported already; never import it here
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


# Fault injection (test seam)


def simulated_oom_steps(environ: dict[str, str] | None = None) -> frozenset[int]:
    """The optimizer steps listed in TAILOR_SIMULATE_OOM_AT ('3' or '3,7'); empty when it is unset or blank."""
    raw = (os.environ if environ is None else environ).get(SIMULATE_OOM_ENV, "").strip()
    if not raw:
        return frozenset()
    steps = set()
    for part in raw.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise TailorError(f"{SIMULATE_OOM_ENV}={raw!r} is not a list of step numbers.",
                              f"Use positive whole numbers separated by commas, like {SIMULATE_OOM_ENV}=3,7; or unset it.")
        steps.add(int(part))
    return frozenset(steps)


def raise_simulated_oom(step: int, steps: frozenset[int]) -> None:
    """Raise the real torch.OutOfMemoryError when `step` is one of `steps`; do nothing otherwise."""
    if step in steps:
        import torch

        raise torch.OutOfMemoryError(SIMULATED_OOM_MESSAGE.format(step=step, env=SIMULATE_OOM_ENV))


class OomSimulator:
    """The seam as a run uses it: each listed step fails once, so the retry after recovery gets past it (a real
    out-of-memory at the same settings would fail again; after recovery the settings are smaller)."""

    def __init__(self, steps: frozenset[int] | None = None):
        self.pending = set(simulated_oom_steps() if steps is None else steps)

    def check(self, step: int) -> None:
        """Call once per optimizer step (1-based), inside the step's try block, before the optimizer updates."""
        if step in self.pending:
            self.pending.discard(step)
            raise_simulated_oom(step, frozenset({step}))
