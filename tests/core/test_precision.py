"""Compute dtype per device, out-of-memory recognition in every form it arrives, and the OOM fault-injection seam.

CUDA is missing on this machine, so the CUDA choice is checked against a FakeCuda standing in for torch.cuda; the
CPU choice, the CPU out-of-memory error and torch.OutOfMemoryError are the real ones.
"""

from __future__ import annotations

import pytest
import torch

from app.core import precision
from app.core.errors import TailorError
from app.core.precision import (
    GENERATION, SIMULATE_OOM_ENV, TRAINING, ComputePrecision, OomSimulator, compute_dtype, cpu_bf16_flags, cpu_precision,
    cpu_vendor, cuda_precision, is_out_of_memory, raise_simulated_oom, simulated_oom_steps,
)


class FakeCuda:
    """A fake torch.cuda for a machine without a GPU: reports one GPU of the given compute capability and, like the
    real torch on Turing and Pascal, says bf16 is 'supported' (emulated) whatever the capability."""

    def __init__(self, capability: tuple[int, int]):
        self.capability = capability
        self.asked_index: list[int] = []

    def is_available(self) -> bool:
        return True

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def get_device_capability(self, index: int = 0) -> tuple[int, int]:
        self.asked_index.append(index)
        return self.capability


@pytest.mark.parametrize("capability, dtype, scaler", [
    ((6, 1), torch.float16, True),   # Pascal, GTX 1060/1080
    ((7, 0), torch.float16, True),   # Volta, V100
    ((7, 5), torch.float16, True),   # Turing, RTX 20xx / T4
    ((8, 0), torch.bfloat16, False),  # Ampere, A100
    ((8, 6), torch.bfloat16, False),  # Ampere, RTX 30xx
    ((8, 9), torch.bfloat16, False),  # Ada, RTX 40xx
    ((9, 0), torch.bfloat16, False),  # Hopper
    ((12, 0), torch.bfloat16, False),  # Blackwell, RTX 50xx
])
def test_cuda_bf16_only_from_compute_capability_8(capability, dtype, scaler):
    precision = cuda_precision(capability)
    assert (precision.dtype, precision.needs_grad_scaler) == (dtype, scaler)
    assert f"{capability[0]}.{capability[1]}" in precision.reason


def test_cuda_choice_ignores_is_bf16_supported_which_counts_emulation(monkeypatch):
    fake = FakeCuda((7, 5))
    monkeypatch.setattr(torch, "cuda", fake)
    assert compute_dtype("cuda") == cuda_precision((7, 5))
    assert compute_dtype("cuda").dtype == torch.float16
    assert compute_dtype("cuda:1").needs_grad_scaler
    assert fake.asked_index == [0, 0, 1], "an explicit cuda:N asks about that GPU, plain 'cuda' about the current one"

    fake.capability = (8, 6)
    assert compute_dtype("cuda") == ComputePrecision(torch.bfloat16, False, cuda_precision((8, 6)).reason)


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse2 avx2 avx512f {extra}
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme sse2 avx2 avx512f {extra}
"""


def test_the_cpu_vendor_is_read_from_cpuinfo():
    assert cpu_vendor(CPUINFO.format(extra="")) == "GenuineIntel"
    assert cpu_vendor(CPUINFO.format(extra="").replace("GenuineIntel", "AuthenticAMD")) == "AuthenticAMD"


@pytest.mark.parametrize("extra, flags", [
    ("avx512_bf16 amx_bf16 amx_tile amx_int8", {"avx512_bf16", "amx_bf16"}),  # Sapphire Rapids
    ("avx512_bf16", {"avx512_bf16"}),  # Zen 4 / Cooper Lake: no AMX
    ("avx512_vnni", set()),  # Ice Lake
    ("", set()),
])
def test_cpu_bf16_units_are_read_from_the_flags(extra, flags):
    assert cpu_bf16_flags(CPUINFO.format(extra=extra)) == flags


@pytest.mark.parametrize("workload, measured_on_amx, measured_on_avx512_bf16",
                         [(TRAINING, torch.bfloat16, torch.bfloat16), (GENERATION, torch.float32, torch.float32)])
def test_cpu_choice_follows_the_measurements_for_the_cpus_bf16_unit(monkeypatch, workload, measured_on_amx,
                                                                    measured_on_avx512_bf16):
    amx, avx512_bf16, none = frozenset({"amx_bf16", "avx512_bf16"}), frozenset({"avx512_bf16"}), frozenset()
    # As measured (precision.BF16_TIME): training steps are clearly faster in bf16 on both units; generation is slower
    # in bf16 on AMX and too little faster on AVX512-BF16 alone (Zen 4) to give up reproducible batched replies.
    assert cpu_precision(amx, workload).dtype == measured_on_amx
    assert cpu_precision(avx512_bf16, workload).dtype == measured_on_avx512_bf16
    assert "with AMX" in cpu_precision(amx, workload).reason
    assert "with AVX512-BF16" in cpu_precision(avx512_bf16, workload).reason
    # Each unit follows its own measurement, and a CPU that emulates bf16 never gets it, whatever was measured.
    for ratio in (0.6, 1.5):
        monkeypatch.setitem(precision.BF16_TIME["avx512_bf16"], workload, ratio)
        assert cpu_precision(avx512_bf16, workload).dtype == (torch.bfloat16 if ratio <= 0.6 else torch.float32)
        assert cpu_precision(amx, workload).dtype == measured_on_amx, "an AMX CPU goes by the AMX measurement"
        assert cpu_precision(none, workload).dtype == torch.float32


def test_cpu_flags_of_this_machine_agree_with_torchs_own_detection():
    flags = cpu_bf16_flags()
    assert ("avx512_bf16" in flags) == torch.cpu._is_avx512_bf16_supported()
    assert ("amx_bf16" in flags) == torch.cpu._is_amx_tile_supported()
    assert compute_dtype("cpu") == cpu_precision(flags)


def test_no_cpuinfo_means_no_claim_of_native_bf16():
    assert cpu_bf16_flags("") == frozenset()
    assert cpu_precision(frozenset()).dtype == torch.float32


# Out of memory

def test_real_cpu_allocation_failure_is_out_of_memory():
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**50, dtype=torch.uint8)  # a petabyte: the real DefaultCPUAllocator failure
    assert type(caught.value) is RuntimeError, "torch reports a CPU OOM as a plain RuntimeError, not OutOfMemoryError"
    assert is_out_of_memory(caught.value)


def test_torch_out_of_memory_error_and_memory_error_are_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("anything"))
    assert is_out_of_memory(MemoryError())


# The plain RuntimeError texts, verbatim as torch, cuBLAS, cuDNN and bitsandbytes raise them on a GPU (no GPU here).
GPU_OOM_MESSAGES = [
    "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 8.00 GiB total capacity; 7.06 GiB already allocated; "
    "0 bytes free; 7.29 GiB reserved in total by PyTorch)",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "Error out of memory at line 88 in file /src/csrc/ops.cu",
    "HIP out of memory. Tried to allocate 1.00 GiB",
    "MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.00 GB, max allowed: 9.07 GB).",
    "[enforce fail at alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes.",
]


@pytest.mark.parametrize("message", GPU_OOM_MESSAGES)
def test_plain_runtime_error_forms_are_out_of_memory(message):
    assert is_out_of_memory(RuntimeError(message))


@pytest.mark.parametrize("exc", [
    RuntimeError("expected scalar type Float but found BFloat16"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"),
    ValueError("the dataset ran out of memory-friendly examples"),
    KeyError("out of memory"),
])
def test_other_errors_are_not_out_of_memory(exc):
    assert not is_out_of_memory(exc)


def test_out_of_memory_is_found_behind_a_wrapping_error():
    try:
        try:
            torch.empty(2**50, dtype=torch.uint8)
        except RuntimeError as inner:
            raise TailorError("Training failed.") from inner
    except TailorError as outer:
        assert is_out_of_memory(outer)
    assert not is_out_of_memory(TailorError("Training failed."))


# Fault injection

def test_simulated_steps_are_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(SIMULATE_OOM_ENV, raising=False)
    assert simulated_oom_steps() == frozenset()
    monkeypatch.setenv(SIMULATE_OOM_ENV, "3")
    assert simulated_oom_steps() == {3}
    monkeypatch.setenv(SIMULATE_OOM_ENV, " 7, 3 ")
    assert simulated_oom_steps() == {3, 7}
    assert simulated_oom_steps({SIMULATE_OOM_ENV: ""}) == frozenset()


@pytest.mark.parametrize("bad", ["three", "3;7", "0", "-2", "3,,7", "2.5"])
def test_a_bad_simulation_value_names_the_variable_and_the_fix(bad):
    with pytest.raises(TailorError) as caught:
        simulated_oom_steps({SIMULATE_OOM_ENV: bad})
    assert SIMULATE_OOM_ENV in caught.value.message and "3,7" in caught.value.hint


def test_the_simulated_failure_is_the_real_torch_out_of_memory_error():
    raise_simulated_oom(2, frozenset({3}))  # not a listed step: nothing happens
    with pytest.raises(torch.OutOfMemoryError) as caught:
        raise_simulated_oom(3, frozenset({3}))
    assert is_out_of_memory(caught.value)
    assert "step 3" in str(caught.value) and SIMULATE_OOM_ENV in str(caught.value)


def test_the_simulator_fails_each_listed_step_once(monkeypatch):
    monkeypatch.setenv(SIMULATE_OOM_ENV, "2,4")
    simulator = OomSimulator()
    failed = []
    for step in (1, 2, 2, 3, 4, 3, 4, 5):  # after each failure the run resumes a little earlier and comes back
        try:
            simulator.check(step)
        except torch.OutOfMemoryError:
            failed.append(step)
    assert failed == [2, 4]
    assert OomSimulator(frozenset()).pending == set()
