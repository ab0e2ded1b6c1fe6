"""GpuMonitor against a fake NVML (GPU present, none, lost mid-run) and against the real pynvml of this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from fake_nvml import GTX_1060, MIB, RTX_3090, RTX_4070, FakeNvml

from app.core.gpu import NO_GPU_MESSAGE, GpuMonitor, free_memory_bytes

REPO = Path(__file__).resolve().parents[2]


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


def test_free_memory_is_vram_of_the_training_gpu_or_system_ram(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
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


# Which GPU torch trains on. NVML numbers GPUs by PCI bus; CUDA numbers only the visible ones, in
# CUDA_VISIBLE_DEVICES order (or fastest first), so the monitor must match by identity, never by index.

MACHINE = [RTX_4070, GTX_1060, RTX_3090]
"""Three cards in PCI bus order (01, 41, 81): NVML's indices 0, 1, 2."""


class FakeCudaRuntime:
    """A FAKE torch.cuda for a machine without NVIDIA GPUs: it enumerates MACHINE-like cards the way the CUDA
    runtime does (CUDA_VISIBLE_DEVICES picks and reorders them, by index or UUID prefix; unset means all of them,
    fastest first) and reports each one's properties as torch does: UUID without the 'GPU-' prefix, PCI address as
    integers."""

    FASTEST_FIRST = (2, 0, 1)  # the RTX 3090 is CUDA's device 0 by default, though it sits last on the PCI bus

    def __init__(self, gpus, environ):
        self.gpus = gpus
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        order = list(range(len(gpus))) if environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" else list(self.FASTEST_FIRST)
        if visible is None:
            self.visible = order
        else:
            self.visible = []
            for entry in visible.split(","):
                entry = entry.strip()
                if entry.isdigit():
                    self.visible.append(order[int(entry)])
                else:
                    self.visible += [i for i, gpu in enumerate(gpus) if _text_of(gpu["uuid"]).startswith(entry)]

    def current_device(self) -> int:
        return 0

    def get_device_properties(self, index: int):
        gpu = self.gpus[self.visible[index]]
        domain, bus, rest = _text_of(gpu["pci"]).split(":")
        return SimpleNamespace(name=_text_of(gpu["name"]), uuid=_text_of(gpu["uuid"]).removeprefix("GPU-"),
                               pci_domain_id=int(domain, 16), pci_bus_id=int(bus, 16),
                               pci_device_id=int(rest.split(".")[0], 16))


def _text_of(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.mark.parametrize("environ, expected_name", [
    ({}, "NVIDIA GeForce RTX 3090"),  # fastest first: CUDA's 0 is NVML's 2
    ({"CUDA_VISIBLE_DEVICES": "1,0"}, "NVIDIA GeForce RTX 4070"),  # CUDA's 1 (fastest-first) is NVML's 0
    ({"CUDA_VISIBLE_DEVICES": "2,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, "NVIDIA GeForce RTX 3090"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-1d2c"}, "NVIDIA GeForce GTX 1060 6GB"),  # a UUID prefix
])
def test_the_gauge_marked_for_training_is_the_gpu_torch_uses(monkeypatch, environ, expected_name):
    from app.core.gpu import torch_device_identity

    cuda = FakeCudaRuntime(MACHINE, environ)
    monkeypatch.setattr("torch.cuda", cuda)
    monitor = GpuMonitor(nvml=FakeNvml(MACHINE))
    monitor.set_training_device(torch_device_identity())
    snapshot = monitor.snapshot()

    assert [gpu.index for gpu in snapshot.gpus] == [0, 1, 2], "every card is still shown, in NVML's order"
    assert snapshot.training_gpu.name == expected_name == cuda.get_device_properties(0).name
    assert sum(gpu.trains_here for gpu in snapshot.gpus) == 1
    chosen = next(gpu for gpu in MACHINE if _text_of(gpu["name"]) == expected_name)
    assert monitor.free_gpu_memory() == chosen["total"] - chosen["used"]


def test_torch_identity_carries_uuid_and_pci_address(monkeypatch):
    from app.core.gpu import DeviceIdentity, torch_device_identity

    monkeypatch.setattr("torch.cuda", FakeCudaRuntime(MACHINE, {"CUDA_VISIBLE_DEVICES": "0"}))
    assert torch_device_identity() == DeviceIdentity(uuid="e0e1e2e3-0000-4000-8000-3090aaaabbbb",
                                                     pci_bus_id="00000000:81:00.0")


@pytest.mark.parametrize("identity_kwargs, expected", [
    (dict(pci_bus_id="0000:41:00.0"), 1),  # sysfs-style 4-digit domain, no UUID
    (dict(uuid="GPU-8F5E2A10-3C4D-4E5F-A6B7-C8D9E0F1A2B3"), 0),  # case does not matter
    (dict(uuid="GPU-0000dead"), None),  # a card that is not in this machine
    (dict(uuid="GPU-"), None),  # a prefix that fits every card names none of them
])
def test_identity_matching_by_uuid_or_pci_bus(identity_kwargs, expected):
    from app.core.gpu import DeviceIdentity

    monitor = GpuMonitor(nvml=FakeNvml(MACHINE), training_device=DeviceIdentity(**identity_kwargs))
    assert monitor.training_index == expected
    snapshot = monitor.snapshot()
    if expected is None:  # unknown: the GPU with the least free memory stands in, so fit is never overstated
        assert not any(gpu.trains_here for gpu in snapshot.gpus)
        assert snapshot.training_gpu.name == "NVIDIA GeForce GTX 1060 6GB"
    else:
        assert snapshot.training_gpu == snapshot.gpus[expected] and snapshot.gpus[expected].trains_here


@pytest.mark.parametrize("environ, expected", [
    ({}, None),  # mixed cards, CUDA's fastest-first 0 cannot be told from NVML alone
    ({"CUDA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, 2),
    ({"CUDA_VISIBLE_DEVICES": "GPU-e0e1e2e3"}, 2),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),  # every GPU hidden: torch trains on the CPU
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "MIG-9a8b7c6d"}, None),
])
def test_without_torch_the_environment_decides(monkeypatch, environ, expected):
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monitor = GpuMonitor(nvml=FakeNvml(MACHINE))
    assert monitor.training_index == expected
    hidden = environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    snapshot = monitor.snapshot()
    assert snapshot.gpus_hidden == hidden and len(snapshot.gpus) == 3
    assert (snapshot.training_gpu is None) == hidden, "with every GPU hidden, training runs on the CPU"


def test_alike_cards_are_in_the_same_order_for_nvml_and_cuda(monkeypatch):
    twins = [dict(RTX_4070, uuid=f"GPU-{n}000", pci=f"00000000:{n}1:00.0") for n in range(3)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    assert GpuMonitor(nvml=FakeNvml(twins)).training_index == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert GpuMonitor(nvml=FakeNvml(twins)).training_index == 0
    single = GpuMonitor(nvml=FakeNvml([RTX_4070]))
    assert single.snapshot().training_gpu.name == "NVIDIA GeForce RTX 4070"


def test_the_gpu_check_skips_cleanly_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run bench/gpu_check.py itself")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("skipped: no CUDA")
