"""The always-visible strip of gauges: VRAM, utilisation, temperature and power per NVIDIA GPU, and system RAM.

NVML is polled on a thread of its own: a healthy driver answers in about a millisecond, but one whose GPU fell off
the bus can block for seconds, and that must freeze the gauges, not the window.
"""

from __future__ import annotations

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QProgressBar, QSizePolicy, QVBoxLayout, QWidget

from app.core.gpu import GpuMonitor, GpuSnapshot, SystemSnapshot
from app.gui.style import BAD, MUTED, gigabytes, repolish

POLL_INTERVAL_MS = 500
"""2 Hz: lively enough to watch memory climb as a model loads, rare enough to cost nothing."""
SHUTDOWN_WAIT_MS = 3000


class _Poller(QObject):
    """Lives on the polling thread; its timer fires there, so a slow NVML call only delays the next reading."""

    snapshot = Signal(object)
    finished = Signal()

    def __init__(self, monitor: GpuMonitor, interval_ms: int):
        super().__init__()
        self._monitor = monitor
        self._interval_ms = interval_ms
        self._timer: QTimer | None = None

    @Slot()
    def run(self) -> None:
        self._timer = QTimer(self)
        self._timer.timeout.connect(self._poll)
        self._timer.start(self._interval_ms)
        self._poll()

    @Slot()
    def _poll(self) -> None:
        self.snapshot.emit(self._monitor.snapshot())

    @Slot()
    def stop(self) -> None:
        self._timer.stop()
        self._monitor.shutdown()
        self.finished.emit()


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
        top = QHBoxLayout()
        top.addWidget(self.caption)
        top.addStretch(1)
        top.addWidget(self.details)
        layout.addLayout(top)
        layout.addWidget(self.bar)
        self.setMinimumWidth(260)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def show_usage(self, caption: str, used: int, total: int, details: str) -> None:
        self.caption.setText(caption)
        share = used / total if total else 0.0
        self.bar.setValue(round(share * 1000))
        self.bar.setFormat(f"{gigabytes(used)} of {gigabytes(total)}")
        self.details.setText(details)
        # Colour warns before the out-of-memory crash does.
        colour = BAD if share >= 0.95 else "#d08a1c" if share >= 0.85 else "#2f6fba"
        self.bar.setStyleSheet(f"QProgressBar::chunk {{ background: {colour}; }}")


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
        self._thread: QThread | None = None
        self._poller: _Poller | None = None
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
        if self._thread is not None:
            return
        self._thread = QThread()
        self._thread.setObjectName("GpuStripPoller")
        self._poller = _Poller(self.monitor, self._interval_ms)
        self._poller.moveToThread(self._thread)
        self._thread.started.connect(self._poller.run)
        self._poller.finished.connect(self._thread.quit)
        self._poller.finished.connect(self._poller.deleteLater)
        self._thread.finished.connect(self._thread.deleteLater)
        self._poller.snapshot.connect(self.show_snapshot)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and release NVML; safe to call twice and before start()."""
        if self._thread is None:
            return
        # The poller's own thread must stop its timer; a direct call from here would touch it across threads.
        self._poller.snapshot.disconnect(self.show_snapshot)
        QTimer.singleShot(0, self._poller, self._poller.stop)
        self._thread.wait(SHUTDOWN_WAIT_MS)
        self._thread = self._poller = None

    def showEvent(self, event) -> None:
        self.start()
        super().showEvent(event)

    def closeEvent(self, event) -> None:
        self.stop()
        super().closeEvent(event)

    # Display

    @Slot(object)
    def show_snapshot(self, snapshot: SystemSnapshot) -> None:
        self.latest = snapshot
        self._match_gauges(len(snapshot.gpus))
        for gauge, gpu in zip(self._gpu_gauges, snapshot.gpus):
            gauge.show_usage(f"GPU {gpu.index} · {gpu.name}", gpu.memory_used, gpu.memory_total, gpu_details(gpu))
        self.ram_gauge.show_usage("System RAM", snapshot.ram_used, snapshot.ram_total, "")
        self.notice.setText(snapshot.message)
        self.notice.setVisible(bool(snapshot.message))
        self.notice.setProperty("tone", "error" if snapshot.is_error else "info")
        self.notice.setStyleSheet(f"color: {BAD}; font-weight: 600;" if snapshot.is_error else "")
        repolish(self.notice)
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
