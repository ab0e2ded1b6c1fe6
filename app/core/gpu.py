"""Live GPU and RAM readings through NVML, for the training panel's gauges and the memory review.

NVML is what nvidia-smi uses: it reads the driver's counters without creating a CUDA context, so polling costs
no GPU memory and works while another process trains. A machine without an NVIDIA driver simply has no GPUs here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil

NO_GPU_MESSAGE = "No NVIDIA GPU found — training runs on the CPU"


@dataclass(frozen=True)
class GpuSnapshot:
    """One GPU at one moment."""

    index: int
    """NVML index, the same numbering nvidia-smi shows."""
    name: str
    memory_used: int
    """Bytes in use by every process on this GPU, not only Tailor."""
    memory_total: int
    utilization_percent: int | None
    """Share of the last sample period the GPU was busy; None where the driver does not report it."""
    temperature_c: int | None
    power_w: float | None
    """Board power draw in watts; None on GPUs that do not report it (many laptop parts)."""


@dataclass(frozen=True)
class SystemSnapshot:
    """Every NVIDIA GPU and the system RAM at one moment."""

    gpus: tuple[GpuSnapshot, ...]
    """GPUs that answered this poll; empty without an NVIDIA GPU or driver."""
    ram_used: int
    """System RAM in use, in bytes (total minus what the OS could hand out now)."""
    ram_total: int
    message: str = ""
    """Plain words on what is missing or went wrong (no GPU, contact lost); empty when all is well."""
    is_error: bool = False
    """True when NVML failed on a GPU that is there (contact lost, or unreadable), as opposed to there being none."""


class GpuMonitor:
    """Polls NVML. Initialised on the first snapshot and kept open; call shutdown() when done.

    `nvml` is the pynvml module, injectable so tests can pass a fake; by default it is imported on first use so that
    importing this module costs nothing.
    """

    def __init__(self, nvml=None):
        self._nvml = nvml
        self._lock = threading.Lock()
        self._started = False
        self._initialised = False
        self._handles: list[tuple[int, str, object]] = []
        self._unavailable = ""
        self._unavailable_is_error = False

    def _start(self) -> None:
        """Initialise NVML and look the GPUs up once; later polls reuse the handles."""
        with self._lock:
            if self._started:
                return
            self._started = True
            if self._nvml is None:
                try:
                    import pynvml
                except ImportError:
                    self._unavailable = NO_GPU_MESSAGE
                    return
                self._nvml = pynvml
            nvml = self._nvml
            try:
                nvml.nvmlInit()
            except nvml.NVMLError:  # no driver, no library, or no device: the same thing to the user
                self._unavailable = NO_GPU_MESSAGE
                return
            self._initialised = True
            try:
                for index in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    self._handles.append((index, _text(nvml.nvmlDeviceGetName(handle)), handle))
            except nvml.NVMLError as exc:
                self._handles = []
                self._unavailable, self._unavailable_is_error = f"Could not read the NVIDIA GPUs: {exc}", True
                return
            if not self._handles:
                self._unavailable = NO_GPU_MESSAGE

    def snapshot(self) -> SystemSnapshot:
        """Read every GPU and the RAM now. Never raises for NVML trouble: it comes back as the message."""
        self._start()
        memory = psutil.virtual_memory()
        ram_used, ram_total = memory.total - memory.available, memory.total
        if self._unavailable:
            return SystemSnapshot((), ram_used, ram_total, self._unavailable, self._unavailable_is_error)
        gpus, problems = [], []
        for index, name, handle in self._handles:
            try:
                gpus.append(self._read(index, name, handle))
            except self._nvml.NVMLError as exc:
                problems.append(f"Lost contact with GPU {index}: {exc}")
        return SystemSnapshot(tuple(gpus), ram_used, ram_total, "\n".join(problems), bool(problems))

    def _read(self, index: int, name: str, handle) -> GpuSnapshot:
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuSnapshot(
            index=index,
            name=name,
            memory_used=int(memory.used),
            memory_total=int(memory.total),
            utilization_percent=self._optional(lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
            temperature_c=self._optional(lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))),
            power_w=self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000),
        )

    def _optional(self, read):
        """A reading some GPUs lack: None when unsupported, while any other error still means contact is lost."""
        try:
            return read()
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) == self._nvml.NVML_ERROR_NOT_SUPPORTED:
                return None
            raise

    def free_gpu_memory(self, index: int = 0) -> int | None:
        """Free bytes on one GPU, or None without that GPU (or when it stopped answering)."""
        self._start()
        for handle_index, _, handle in self._handles:
            if handle_index == index:
                try:
                    return int(self._nvml.nvmlDeviceGetMemoryInfo(handle).free)
                except self._nvml.NVMLError:
                    return None
        return None

    def shutdown(self) -> None:
        """Release NVML (call it once polling has stopped); a later snapshot starts it again."""
        with self._lock:
            if self._initialised:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError:
                    pass  # the driver is gone already; nothing left to release
            self._started = self._initialised = self._unavailable_is_error = False
            self._handles = []
            self._unavailable = ""


def _text(value) -> str:
    """Older nvidia-ml-py releases return bytes for names."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def free_memory_bytes(device: str, nvml=None) -> int:
    """Memory a training run on `device` could use now: free VRAM of GPU 0, or available system RAM.

    Falls back to RAM when there is no NVIDIA GPU to ask, since that is where training would then run.
    """
    if device == "cuda":
        monitor = GpuMonitor(nvml)
        try:
            free = monitor.free_gpu_memory(0)
        finally:
            monitor.shutdown()
        if free is not None:
            return free
    return int(psutil.virtual_memory().available)
