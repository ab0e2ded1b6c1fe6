"""A fake of the pynvml module, shared by the core tests (GpuMonitor, `tailor estimate`)."""

from __future__ import annotations

from types import SimpleNamespace

MIB = 1024**2


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

    def nvmlDeviceGetUUID(self, handle):
        return self.gpus[handle.index]["uuid"]

    def nvmlDeviceGetPciInfo(self, handle):
        return SimpleNamespace(busId=self.gpus[handle.index]["pci"], domain=0)

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


RTX_4070 = dict(name="NVIDIA GeForce RTX 4070", used=1500 * MIB, total=12282 * MIB, util=87, temp=64, milliwatts=181_250,
                uuid="GPU-8f5e2a10-3c4d-4e5f-a6b7-c8d9e0f1a2b3", pci="00000000:01:00.0")
GTX_1060 = dict(name=b"NVIDIA GeForce GTX 1060 6GB", used=300 * MIB, total=6144 * MIB, util=0, temp=41, milliwatts=9_000,
                uuid=b"GPU-1d2c3b4a-5f6e-4789-8a9b-0c1d2e3f4a5b", pci=b"00000000:41:00.0")  # older pynvml: bytes
RTX_3090 = dict(name="NVIDIA GeForce RTX 3090", used=900 * MIB, total=24576 * MIB, util=5, temp=38, milliwatts=30_000,
                uuid="GPU-e0e1e2e3-0000-4000-8000-3090aaaabbbb", pci="00000000:81:00.0")
