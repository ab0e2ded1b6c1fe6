"""GpuMonitor against a fake NVML (GPU present, none, lost mid-run) and against the real pynvml of this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from app.core.gpu import NO_GPU_MESSAGE, GpuMonitor, free_memory_bytes

MIB = 1024**2
REPO = Path(__file__).resolve().parents[2]


class FakeNvml:
    """A stand-in for the pynvml module. It is a fake because the machine these tests were written on has no
    NVIDIA GPU, so the real library can only ever say 'not found'; this one plays any number of GPUs and failures.

    It mirrors the pynvml calls GpuMonitor uses, with pynvml's units (bytes, percent, °C, milliwatts) and error
    class (NVMLError carrying an NVML error code in `.value`), and counts calls so tests can check the caching.
    """

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        def __init__(self, value: int, text: str):
            super().__init__(text)
            self.value = value

    def __init__(self, gpus=(), init_error: bool = False, power_supported: bool = True):
        self.gpus = [dict(gpu) for gpu in gpus]
        self.init_error = init_error
        self.power_supported = power_supported
        self.lost_after_polls: dict[int, int] = {}
        self.memory_polls: dict[int, int] = {}
        self.init_calls = self.shutdown_calls = self.handle_calls = 0

    def nvmlInit(self):
        self.init_calls += 1
        if self.init_error:
            raise self.NVMLError(self.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self.handle_calls += 1
        return SimpleNamespace(index=index)

    def nvmlDeviceGetName(self, handle):
        return self.gpus[handle.index]["name"]

    def nvmlDeviceGetMemoryInfo(self, handle):
        polls = self.memory_polls[handle.index] = self.memory_polls.get(handle.index, 0) + 1
        if polls > self.lost_after_polls.get(handle.index, polls):
            raise self.NVMLError(self.NVML_ERROR_GPU_IS_LOST, "GPU is lost")
        gpu = self.gpus[handle.index]
        return SimpleNamespace(used=gpu["used"], total=gpu["total"], free=gpu["total"] - gpu["used"])

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=self.gpus[handle.index]["util"], memory=0)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self.gpus[handle.index]["temp"]

    def nvmlDeviceGetPowerUsage(self, handle):
        if not self.power_supported:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED, "Not Supported")
        return self.gpus[handle.index]["milliwatts"]


RTX_4070 = dict(name="NVIDIA GeForce RTX 4070", used=1500 * MIB, total=12282 * MIB, util=87, temp=64, milliwatts=181_250)
GTX_1060 = dict(name=b"NVIDIA GeForce GTX 1060 6GB", used=300 * MIB, total=6144 * MIB, util=0, temp=41, milliwatts=9_000)


def test_readings_come_through_in_bytes_percent_degrees_and_watts():
    monitor = GpuMonitor(nvml=FakeNvml([RTX_4070, GTX_1060]))
    snapshot = monitor.snapshot()

    assert snapshot.message == "" and not snapshot.is_error
    first, second = snapshot.gpus
    assert (first.index, first.name) == (0, "NVIDIA GeForce RTX 4070")
    assert (first.memory_used, first.memory_total) == (1500 * MIB, 12282 * MIB)
    assert (first.utilization_percent, first.temperature_c, first.power_w) == (87, 64, 181.25)
    assert (second.index, second.name) == (1, "NVIDIA GeForce GTX 1060 6GB")  # older pynvml returns bytes
    assert second.memory_total == 6144 * MIB
    assert 0 < snapshot.ram_used <= snapshot.ram_total == psutil.virtual_memory().total


def test_unsupported_power_reading_is_none_not_an_error():
    snapshot = GpuMonitor(nvml=FakeNvml([RTX_4070], power_supported=False)).snapshot()
    assert snapshot.gpus[0].power_w is None
    assert snapshot.gpus[0].temperature_c == 64
    assert snapshot.message == ""


def test_no_driver_says_so_in_plain_words():
    fake = FakeNvml(init_error=True)
    monitor = GpuMonitor(nvml=fake)
    snapshot = monitor.snapshot()
    assert snapshot.message == "No NVIDIA GPU found — training runs on the CPU"
    assert snapshot.gpus == () and not snapshot.is_error
    assert snapshot.ram_total > 0
    monitor.snapshot()
    assert fake.init_calls == 1  # a missing driver is not retried on every poll
    monitor.shutdown()
    assert fake.shutdown_calls == 0  # nothing was initialised, so nothing to shut down


def test_driver_without_gpus_says_the_same():
    snapshot = GpuMonitor(nvml=FakeNvml([])).snapshot()
    assert snapshot.message == NO_GPU_MESSAGE
    assert snapshot.gpus == ()


def test_gpu_lost_mid_run_becomes_a_message_not_an_exception():
    fake = FakeNvml([RTX_4070, GTX_1060])
    fake.lost_after_polls[0] = 1
    monitor = GpuMonitor(nvml=fake)

    assert len(monitor.snapshot().gpus) == 2
    later = monitor.snapshot()
    assert later.is_error
    assert later.message == "Lost contact with GPU 0: GPU is lost"
    assert [gpu.index for gpu in later.gpus] == [1]  # the other GPU still reports
    assert monitor.snapshot().message == later.message


def test_nvml_is_initialised_once_and_handles_are_cached():
    fake = FakeNvml([RTX_4070, GTX_1060])
    monitor = GpuMonitor(nvml=fake)
    for _ in range(50):
        monitor.snapshot()
    assert fake.init_calls == 1
    assert fake.handle_calls == 2
    assert fake.memory_polls == {0: 50, 1: 50}

    monitor.shutdown()
    assert fake.shutdown_calls == 1
    monitor.snapshot()  # a snapshot after shutdown starts NVML again rather than using dead handles
    assert (fake.init_calls, fake.handle_calls) == (2, 4)


def test_free_memory_is_vram_of_gpu_0_or_system_ram():
    fake = FakeNvml([RTX_4070])
    assert free_memory_bytes("cuda", nvml=fake) == (12282 - 1500) * MIB
    assert fake.shutdown_calls == 1

    ram_available = psutil.virtual_memory().available
    for free in (free_memory_bytes("cpu"), free_memory_bytes("cuda", nvml=FakeNvml(init_error=True))):
        assert free == pytest.approx(ram_available, rel=0.2)


def test_real_pynvml_on_this_machine_reports_no_gpu():
    """This machine has no NVIDIA GPU, so the real library must end in the plain-words message, not an error."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        if count:
            pytest.skip("this machine has an NVIDIA GPU")
    monitor = GpuMonitor()
    try:
        snapshot = monitor.snapshot()
    finally:
        monitor.shutdown()
    assert snapshot.message == NO_GPU_MESSAGE
    assert snapshot.gpus == () and not snapshot.is_error


def test_importing_the_module_loads_neither_nvml_nor_torch():
    code = "import sys, app.core.gpu; print('pynvml' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.split() == ["False", "False"]
