"""The always-visible strip of gauges: VRAM, utilisation, temperature and power per NVIDIA GPU, and system RAM.

NVML is polled on a thread of its own: a healthy driver answers in about a millisecond, but one whose GPU fell off
the bus can block for seconds, and that must freeze the gauges, not the window. The poller is a Worker like any
other background job, so it shares their thread lifecycle.
"""

from __future__ import annotations

import threading
import weakref

from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QProgressBar, QSizePolicy, QVBoxLayout, QWidget

from app.core.gpu import DeviceIdentity, GpuMonitor, GpuSnapshot, SystemSnapshot
from app.gui.style import BAD, MUTED, gigabytes
from app.gui.workers import Job, Worker

POLL_INTERVAL_MS = 500
"""2 Hz: lively enough to watch memory climb as a model loads, rare enough to cost nothing."""
SHUTDOWN_WAIT_MS = 3000
TRAINS_HERE = "Tailor trains here"
"""Marks, on a machine with several GPUs, the one torch uses (NVML's numbering differs from CUDA's)."""


class _PollWorker(Worker):
    """Reads NVML every interval on its own thread until told to stop, then releases NVML there."""

    def __init__(self, monitor: GpuMonitor, interval_s: float, stop: threading.Event):
        super().__init__()
        self._monitor, self._interval_s, self._stop = monitor, interval_s, stop

    def work(self) -> None:
        try:
            while True:
                self.event.emit(self._monitor.snapshot())
                if self._stop.wait(self._interval_s):
                    return
        finally:
            self._monitor.shutdown()


class _Gauge(QFrame):
    """A caption, a bar and a line of details: one GPU, or the system RAM."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("gauge")
        self.caption = QLabel()
        self.caption.setStyleSheet("font-weight: 600;")
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(True)
        self.bar.setFixedHeight(16)
        self.details = QLabel()
        self.details.setStyleSheet(f"color: {MUTED};")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 4, 8, 4)
        layout.setSpacing(2)
        # Caption, bar and readings each get the whole width: GPU names are long.
        layout.addWidget(self.caption)
        layout.addWidget(self.bar)
        layout.addWidget(self.details)
        self.setMinimumWidth(260)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def show_usage(self, caption: str, used: int, total: int, details: str) -> None:
        self.caption.setText(caption)
        share = used / total if total else 0.0
        self.bar.setValue(round(share * 1000))
        self.bar.setFormat(f"{gigabytes(used)} of {gigabytes(total)}")
        self.details.setText(details)
        # Colour warns before the out-of-memory crash does; light shades keep the dark text readable on top.
        colour = "#ef9a92" if share >= 0.95 else "#f3c977" if share >= 0.85 else "#9cc3ee"
        self.bar.setStyleSheet(
            "QProgressBar { border: 1px solid #c9ced6; border-radius: 3px; background: white; text-align: center; }"
            f"QProgressBar::chunk {{ background: {colour}; border-radius: 2px; }}")


def gpu_details(gpu: GpuSnapshot) -> str:
    parts = []
    if gpu.utilization_percent is not None:
        parts.append(f"{gpu.utilization_percent}% busy")
    if gpu.temperature_c is not None:
        parts.append(f"{gpu.temperature_c} °C")
    if gpu.power_w is not None:
        parts.append(f"{gpu.power_w:.0f} W")
    return " · ".join(parts)


class GpuStrip(QFrame):
    """Gauges for every GPU NVML reports, plus RAM; says in words when there is no GPU or it stopped answering."""

    snapshot_received = Signal(object)
    """Every SystemSnapshot, for others that need free memory (the review page) without calling NVML themselves."""

    def __init__(self, monitor: GpuMonitor | None = None, interval_ms: int = POLL_INTERVAL_MS,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.monitor = monitor or GpuMonitor()
        self.latest: SystemSnapshot | None = None
        self._interval_ms = interval_ms
        self._job: Job | None = None
        self._stop_polling = threading.Event()
        self._gpu_gauges: list[_Gauge] = []

        self.notice = QLabel("Looking for NVIDIA GPUs…")
        self.notice.setWordWrap(True)
        self.notice.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.ram_gauge = _Gauge()
        self._layout = QHBoxLayout(self)
        self._layout.setContentsMargins(8, 4, 8, 4)
        self._layout.setSpacing(8)
        self._layout.addWidget(self.notice, 1)
        self._layout.addWidget(self.ram_gauge)

    # Polling lifecycle

    def start(self) -> None:
        if self._job is not None:
            return
        self._stop_polling = threading.Event()
        self._job = Job(_PollWorker(self.monitor, self._interval_ms / 1000, self._stop_polling))
        self._job.event.connect(self.show_snapshot)
        self._job.start()
        # A strip deleted without stop() (its window torn down) must not leave the poller running forever.
        weakref.finalize(self, self._stop_polling.set)

    def stop(self) -> None:
        """Stop polling and release NVML; safe to call twice and before start()."""
        if self._job is None:
            return
        self._stop_polling.set()
        self._job.wait(SHUTDOWN_WAIT_MS)
        self._job = None

    def showEvent(self, event) -> None:
        self.start()
        super().showEvent(event)

    def closeEvent(self, event) -> None:
        self.stop()
        super().closeEvent(event)

    def set_training_device(self, identity: DeviceIdentity) -> None:
        """The GPU the trainer reports it runs on (torch_device_identity() in its process); marked from the next poll."""
        self.monitor.set_training_device(identity)

    # Display

    @Slot(object)
    def show_snapshot(self, snapshot: SystemSnapshot) -> None:
        self.latest = snapshot
        self._match_gauges(len(snapshot.gpus))
        # The GPU torch trains on comes first; NVML's numbering (nvidia-smi's) stays in the caption.
        ordered = sorted(snapshot.gpus, key=lambda gpu: not gpu.trains_here)
        several = len(snapshot.gpus) > 1
        for gauge, gpu in zip(self._gpu_gauges, ordered):
            details = gpu_details(gpu)
            if several and gpu.trains_here:
                details = " · ".join(filter(None, (TRAINS_HERE, details)))
            gauge.show_usage(f"GPU {gpu.index} · {gpu.name}", gpu.memory_used, gpu.memory_total, details)
            gauge.caption.setToolTip(gauge.caption.text())
        self.ram_gauge.show_usage("System RAM", snapshot.ram_used, snapshot.ram_total, "")
        self.notice.setText(snapshot.message)
        self.notice.setVisible(bool(snapshot.message))
        self.notice.setStyleSheet(f"color: {BAD}; font-weight: 600;" if snapshot.is_error else "")
        self.snapshot_received.emit(snapshot)

    def _match_gauges(self, count: int) -> None:
        while len(self._gpu_gauges) < count:
            gauge = _Gauge()
            self._layout.insertWidget(len(self._gpu_gauges), gauge)
            self._gpu_gauges.append(gauge)
        while len(self._gpu_gauges) > count:
            gauge = self._gpu_gauges.pop()
            self._layout.removeWidget(gauge)
            gauge.deleteLater()
