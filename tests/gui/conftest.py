"""GUI test fixtures: settings kept per test, a check that no test leaves a QThread running, and FakeNvml.

The thread check follows napari's conftest: QThread.start is wrapped to remember every thread a test starts, and
after the test (pytest-qt has closed its widgets by then) any that is still running fails the test.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("PySide6")
from PySide6.QtCore import QSettings, QThread  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from app.core.config import DataSettings, ModelSource, RunConfig, TrainingSettings  # noqa: E402
from app.core.library import Library  # noqa: E402


def _roomy_offscreen_screen() -> None:
    """Qt's offscreen platform pretends to have an 800x800 screen, which clamps restored window geometry; give it
    a 1920x1080 one so window sizes in tests behave as on a desktop."""
    if os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        return
    screens = {"screens": [{"name": "virtual", "x": 0, "y": 0, "width": 1920, "height": 1080,
                            "logicalDpi": 96, "logicalBaseDpi": 96, "dpr": 1}]}
    handle, path = tempfile.mkstemp(prefix="tailor-screen-", suffix=".json")
    with os.fdopen(handle, "w") as config:
        json.dump(screens, config)
    os.environ["QT_QPA_PLATFORM"] = f"offscreen:configfile={path}"


_roomy_offscreen_screen()

GB = 1024**3
THREAD_GRACE_S = 10
"""A thread whose worker has finished still needs a moment to leave its event loop; longer than that is a leak."""


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path) -> Path:
    """QSettings (window geometry, last run) in a per-test folder, never the developer's own."""
    folder = tmp_path / "settings"
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(folder))
    return folder


class ThreadTracker:
    """Remembers each QThread started while installed, with where it was started from."""

    def __init__(self):
        self.started: weakref.WeakKeyDictionary[QThread, str] = weakref.WeakKeyDictionary()

    def install(self, monkeypatch) -> None:
        original_start = QThread.start
        tracker = self

        def start(thread, *args):
            tracker.started[thread] = "".join(traceback.format_stack(limit=6)[:-1])
            original_start(thread, *args)

        monkeypatch.setattr(QThread, "start", start)

    def running(self) -> list[tuple[QThread, str]]:
        alive = []
        for thread, origin in list(self.started.items()):
            try:
                if thread.isRunning():
                    alive.append((thread, origin))
            except RuntimeError:
                pass  # the C++ thread was deleted (deleteLater after finishing): it is certainly not running
        return alive

    def wait_until_idle(self, timeout_s: float) -> list[tuple[QThread, str]]:
        deadline = time.monotonic() + timeout_s
        while self.running() and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.02)
        return self.running()


@pytest.fixture(autouse=True)
def qthread_tracker(qapp, monkeypatch):
    tracker = ThreadTracker()
    tracker.install(monkeypatch)
    yield tracker
    leaked = tracker.wait_until_idle(THREAD_GRACE_S)
    if leaked:
        for thread, _ in leaked:
            thread.quit()
            thread.wait(5000)
        details = "\n\n".join(f"QThread {thread.objectName() or thread!r} started at:\n{origin}"
                              for thread, origin in leaked)
        pytest.fail(f"The test left {len(leaked)} QThread(s) running:\n{details}", pytrace=False)


# NVML


@dataclass
class FakeGpu:
    name: str = "NVIDIA GeForce RTX 4070"
    memory_total: int = 12 * GB
    memory_used: int = 3 * GB
    utilization: int = 57
    temperature: int = 64
    power_mw: int | None = 120_000
    """None: this GPU does not report power (NVML says 'not supported', as many laptop GPUs do)."""
    lost: bool = False
    uuid: str = "GPU-8f5e2a10-3c4d-4e5f-a6b7-c8d9e0f1a2b3"
    """What nvmlDeviceGetUUID answers; the GPU torch trains on is matched by it."""
    pci_bus_id: str = "00000000:01:00.0"


class FakeNvml:
    """A FAKE of the pynvml module, because this machine (and CI) has no NVIDIA GPU or driver.

    It implements the calls app.core.gpu makes, with NVML's own error codes, for the GPUs it is given. It counts
    initialisations and handle look-ups (so tests can check NVML is set up once and handles are cached), can be built
    with no driver at all, can make one GPU 'fall off the bus' mid-run, and can answer slowly like a struggling
    driver. It is passed to GpuMonitor(nvml=...) in place of pynvml; Tailor's own code is the real thing.
    """

    NVML_TEMPERATURE_GPU = 0
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_GPU_IS_LOST = 15
    _MESSAGES = {12: "NVML Shared Library Not Found", 3: "Not Supported", 15: "GPU is lost"}

    class NVMLError(Exception):
        def __init__(self, value: int):
            super().__init__(FakeNvml._MESSAGES.get(value, f"NVML error {value}"))
            self.value = value

    def __init__(self, gpus: list[FakeGpu] | None = None, driver: bool = True, delay_s: float = 0.0):
        self.gpus = list(gpus or [])
        self.driver = driver
        self.delay_s = delay_s
        self.init_calls = 0
        self.shutdown_calls = 0
        self.handle_lookups = 0
        self.memory_reads = 0
        self._lock = threading.Lock()

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if not self.driver:
            raise self.NVMLError(self.NVML_ERROR_LIBRARY_NOT_FOUND)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self.handle_lookups += 1
        return self.gpus[index]

    def _check(self, gpu: FakeGpu) -> None:
        if gpu.lost:
            raise self.NVMLError(self.NVML_ERROR_GPU_IS_LOST)

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        self._check(gpu)
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        self._check(gpu)
        return gpu.uuid

    def nvmlDeviceGetPciInfo(self, gpu: FakeGpu):
        self._check(gpu)
        return SimpleNamespace(busId=gpu.pci_bus_id)

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu):
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.memory_reads += 1
        self._check(gpu)
        return SimpleNamespace(total=gpu.memory_total, used=gpu.memory_used, free=gpu.memory_total - gpu.memory_used)

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu):
        self._check(gpu)
        return SimpleNamespace(gpu=gpu.utilization, memory=0)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        self._check(gpu)
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        self._check(gpu)
        if gpu.power_mw is None:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return gpu.power_mw


@pytest.fixture
def fakes() -> SimpleNamespace:
    """FakeNvml and FakeGpu for tests (conftest modules cannot be imported by name: there is one per folder)."""
    return SimpleNamespace(FakeNvml=FakeNvml, FakeGpu=FakeGpu, GB=GB)


@pytest.fixture
def no_gpu_monitor():
    """A GpuMonitor that finds no NVIDIA driver, whatever the machine: review pages then size against RAM."""
    from app.core.gpu import GpuMonitor

    return GpuMonitor(FakeNvml(driver=False))


# Training


@pytest.fixture
def library(library_root) -> Library:
    return Library(library_root)


@pytest.fixture
def tiny_run(tiny_base, chat_jsonl):
    """Build a RunConfig on the tiny model: 4-bit, batch 4, and as many steps as the test needs."""

    def build(name: str = "tiny", max_steps: int = 4, **training) -> RunConfig:
        return RunConfig(
            name=name,
            data=DataSettings(path=str(chat_jsonl), max_len=128),
            model=ModelSource(base=str(tiny_base), quant="4bit"),
            training=TrainingSettings(max_steps=max_steps, batch_size=training.pop("batch_size", 4),
                                      checkpoint_every=training.pop("checkpoint_every", 1000), **training),
        )

    return build


@pytest.fixture
def open_window(qtbot, library):
    """Open the real main window on this test's library; pass a GpuMonitor (with FakeNvml) to choose the GPUs."""
    from app.gui.main_window import MainWindow

    # qtbot only keeps weak references: these keep each window alive until pytest-qt closes it after the test, so
    # its closeEvent stops the worker threads (chat, GPU polling) instead of Python deleting it mid-run.
    windows = []

    def open_(monitor=None, library_=None):
        window = MainWindow(library_ or library, gpu_monitor=monitor)
        windows.append(window)
        qtbot.addWidget(window)
        window.show()
        qtbot.waitUntil(lambda: window.gpu_strip.latest is not None)
        return window

    yield open_
