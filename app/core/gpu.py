"""Live GPU and RAM readings through NVML, for the training panel's gauges and the memory review.

NVML is what nvidia-smi uses: it reads the driver's counters without creating a CUDA context, so polling costs
no GPU memory and works while another process trains. A machine without an NVIDIA driver simply has no GPUs here.

NVML numbers GPUs by PCI bus and ignores CUDA_VISIBLE_DEVICES; CUDA numbers them fastest-first (unless
CUDA_DEVICE_ORDER=PCI_BUS_ID) and only counts the visible ones. So "GPU 0" can be two different cards to the two of
them. The GPU that torch trains on is therefore matched by identity, never by index: its UUID or PCI bus id as torch
reports them (`torch_device_identity`), or, where torch is not loaded (the GUI process), as CUDA_VISIBLE_DEVICES and
CUDA_DEVICE_ORDER determine it (`environment_selector`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import NamedTuple

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
    trains_here: bool = False
    """This is the GPU torch trains on (matched by UUID / PCI bus id, not by index)."""


@dataclass(frozen=True)
class DeviceIdentity:
    """Who a GPU is, in terms NVML and CUDA share (indices are not: they number GPUs differently)."""

    uuid: str | None = None
    """'GPU-8f5e...' as nvidia-smi prints it, or a unique prefix of it (CUDA_VISIBLE_DEVICES accepts prefixes)."""
    pci_bus_id: str | None = None
    """'00000000:01:00.0': PCI domain, bus, device and function."""

    def matches(self, uuid: str | None, pci_bus_id: str | None) -> bool:
        if self.uuid and uuid:
            return normalise_uuid(uuid).startswith(normalise_uuid(self.uuid))
        if self.pci_bus_id and pci_bus_id:
            return normalise_pci_bus_id(pci_bus_id) == normalise_pci_bus_id(self.pci_bus_id)
        return False


@dataclass(frozen=True)
class NvmlIndex:
    """An index in CUDA's order: NVML's own index when CUDA also counts in PCI bus order."""

    index: int
    pci_order: bool = False
    """CUDA_DEVICE_ORDER=PCI_BUS_ID. Otherwise CUDA puts the fastest GPU first, which NVML's order matches only
    when all the GPUs are the same model."""


@dataclass(frozen=True)
class NoVisibleGpu:
    """CUDA_VISIBLE_DEVICES hides every GPU ('' or '-1'): torch trains on the CPU."""


Selector = DeviceIdentity | NvmlIndex | NoVisibleGpu | None
"""Which GPU torch trains on, as far as is known; None: not known (use the only GPU, or none if several)."""


def normalise_uuid(uuid: str) -> str:
    """'GPU-8F5E…' (NVML) and '8f5e…' (torch) name the same GPU."""
    uuid = str(uuid).strip().lower()
    return uuid.removeprefix("gpu-")


def normalise_pci_bus_id(bus_id: str) -> str:
    """NVML writes an 8-digit domain ('00000000:01:00.0'), sysfs and torch a 4-digit one ('0000:01:00.0')."""
    domain, _, rest = str(bus_id).strip().lower().partition(":")
    return f"{int(domain, 16):08x}:{rest}"


def torch_device_identity(index: int | None = None) -> DeviceIdentity:
    """The UUID and PCI bus id of the CUDA device torch uses (the current one unless `index` is given)."""
    import torch

    index = torch.cuda.current_device() if index is None else index
    properties = torch.cuda.get_device_properties(index)
    uuid = str(getattr(properties, "uuid", "") or "") or None
    try:
        pci = (f"{properties.pci_domain_id:08x}:{properties.pci_bus_id:02x}:{properties.pci_device_id:02x}.0")
    except AttributeError:  # torch builds before 2.5 do not report the PCI address
        pci = None
    return DeviceIdentity(uuid=uuid, pci_bus_id=pci)


def environment_selector(environ=None) -> Selector:
    """The GPU torch would train on, worked out from the environment alone (no torch, no CUDA context).

    torch uses the first device CUDA lists. An empty or '-1' CUDA_VISIBLE_DEVICES hides every GPU. A UUID (or UUID
    prefix) names the card outright. An integer is an index in CUDA's order, which is NVML's PCI bus order only
    when CUDA_DEVICE_ORDER=PCI_BUS_ID; in CUDA's default fastest-first order it is known only when the GPUs are all
    alike, which GpuMonitor checks. Unset means index 0.
    """
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return NvmlIndex(0)
    first = visible.split(",")[0].strip()
    if not first or first.startswith("-"):
        return NoVisibleGpu()
    if first.lower().startswith("gpu-"):
        return DeviceIdentity(uuid=first)
    if first.isdigit():
        return NvmlIndex(int(first), pci_order=environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID")
    return None  # a MIG slice: NVML shows its parent card, which this cannot name


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

    gpus_hidden: bool = False
    """CUDA_VISIBLE_DEVICES hides every GPU from torch, so training runs on the CPU although NVML sees GPUs."""

    @property
    def training_gpu(self) -> GpuSnapshot | None:
        """The GPU torch trains on; None when training runs on the CPU.

        When several different GPUs are visible and nothing says which one CUDA calls device 0 (its fastest-first
        order is unspecified), the one with the least free memory stands in: judging fit against it never says
        'fits' wrongly. The trainer's own report (GpuMonitor.set_training_device) removes the doubt."""
        if self.gpus_hidden or not self.gpus:
            return None
        marked = next((gpu for gpu in self.gpus if gpu.trains_here), None)
        return marked or min(self.gpus, key=lambda gpu: gpu.memory_total - gpu.memory_used)


class GpuMonitor:
    """Polls NVML. Initialised on the first snapshot and kept open; call shutdown() when done.

    `nvml` is the pynvml module, injectable so tests can pass a fake; by default it is imported on first use so that
    importing this module costs nothing.
    """

    def __init__(self, nvml=None, training_device: Selector = None):
        self._nvml = nvml
        self._lock = threading.Lock()
        self._started = False
        self._initialised = False
        self._handles: list[_Handle] = []
        self._unavailable = ""
        self._unavailable_is_error = False
        self._selector = training_device
        self._training_index: int | None = None

    def set_training_device(self, identity: DeviceIdentity) -> None:
        """Name the GPU torch trains on (the trainer knows it exactly: torch_device_identity())."""
        with self._lock:
            self._selector = identity
            self._training_index = self._match(identity)

    @property
    def training_index(self) -> int | None:
        """NVML index of the GPU torch trains on; None when that is the CPU or it cannot be told apart."""
        self._start()
        return self._training_index

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
                    self._handles.append(_Handle(index, _text(nvml.nvmlDeviceGetName(handle)), handle,
                                                 self._identity_part(lambda: nvml.nvmlDeviceGetUUID(handle)),
                                                 self._identity_part(lambda: nvml.nvmlDeviceGetPciInfo(handle).busId)))
            except nvml.NVMLError as exc:
                self._handles = []
                self._unavailable, self._unavailable_is_error = f"Could not read the NVIDIA GPUs: {exc}", True
                return
            if not self._handles:
                self._unavailable = NO_GPU_MESSAGE
                return
            if self._selector is None:
                self._selector = environment_selector()
            self._training_index = self._match(self._selector)

    def _identity_part(self, read) -> str | None:
        try:
            return _text(read())
        except self._nvml.NVMLError:
            return None

    def _match(self, selector: Selector) -> int | None:
        """The NVML index `selector` points at, or None if it points at none or more than one."""
        if isinstance(selector, DeviceIdentity):
            hits = [handle.index for handle in self._handles if selector.matches(handle.uuid, handle.pci_bus_id)]
            return hits[0] if len(hits) == 1 else None
        if isinstance(selector, NvmlIndex) and selector.index < len(self._handles):
            alike = len({handle.name for handle in self._handles}) == 1
            return selector.index if selector.pci_order or alike else None
        return None

    def snapshot(self) -> SystemSnapshot:
        """Read every GPU and the RAM now. Never raises for NVML trouble: it comes back as the message."""
        self._start()
        memory = psutil.virtual_memory()
        ram_used, ram_total = memory.total - memory.available, memory.total
        if self._unavailable:
            return SystemSnapshot((), ram_used, ram_total, self._unavailable, self._unavailable_is_error)
        gpus, problems = [], []
        for index, name, handle, _, _ in self._handles:
            try:
                gpus.append(self._read(index, name, handle))
            except self._nvml.NVMLError as exc:
                problems.append(f"Lost contact with GPU {index}: {exc}")
        return SystemSnapshot(tuple(gpus), ram_used, ram_total, "\n".join(problems), bool(problems),
                              gpus_hidden=isinstance(self._selector, NoVisibleGpu))

    def _read(self, index: int, name: str, handle) -> GpuSnapshot:
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuSnapshot(
            index=index,
            name=name,
            trains_here=index == self._training_index,
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

    def free_gpu_memory(self, index: int | None = None) -> int | None:
        """Free bytes on one GPU (by default the one torch trains on), or None without it (or when it stopped
        answering)."""
        self._start()
        index = self._training_index if index is None else index
        for handle in self._handles:
            if handle.index == index:
                try:
                    return int(self._nvml.nvmlDeviceGetMemoryInfo(handle.handle).free)
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
            self._training_index = None
            self._unavailable = ""


class _Handle(NamedTuple):
    index: int
    name: str
    handle: object
    uuid: str | None
    pci_bus_id: str | None


def _text(value) -> str:
    """Older nvidia-ml-py releases return bytes for names."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def free_memory_bytes(device: str, nvml=None) -> int:
    """Memory a training run on `device` could use now: free VRAM of the GPU torch trains on, or available RAM.

    Falls back to RAM when there is no NVIDIA GPU to ask, since that is where training would then run.
    """
    if device == "cuda":
        monitor = GpuMonitor(nvml)
        try:
            free = monitor.free_gpu_memory()
        finally:
            monitor.shutdown()
        if free is not None:
            return free
    return int(psutil.virtual_memory().available)
