"""The GPU strip with NVML present, absent, failing mid-run, and slow; FakeNvml stands in for the driver here."""

from __future__ import annotations

from PySide6.QtCore import QElapsedTimer, QTimer

from app.core.gpu import NO_GPU_MESSAGE, GpuMonitor
from app.gui.gpu_strip import GpuStrip

FAST_POLL_MS = 50


def make_strip(qtbot, nvml) -> GpuStrip:
    strip = GpuStrip(GpuMonitor(nvml), interval_ms=FAST_POLL_MS)
    qtbot.addWidget(strip)
    strip.show()
    return strip


def test_one_gauge_per_gpu_with_memory_use_temperature_and_power(qtbot, fakes):
    nvml = fakes.FakeNvml([fakes.FakeGpu(name="NVIDIA GeForce RTX 4070"),
                           fakes.FakeGpu(name="NVIDIA RTX A2000", memory_total=6 * fakes.GB, memory_used=5 * fakes.GB,
                                         power_mw=None)])
    strip = make_strip(qtbot, nvml)
    qtbot.waitUntil(lambda: len(strip._gpu_gauges) == 2)

    first, second = strip._gpu_gauges
    assert first.caption.text() == "GPU 0 · NVIDIA GeForce RTX 4070"
    assert first.bar.text() == "3.00 GB of 12.0 GB"
    assert first.bar.value() == 250
    assert first.details.text() == "57% busy · 64 °C · 120 W"
    assert second.caption.text() == "GPU 1 · NVIDIA RTX A2000"
    assert second.details.text() == "57% busy · 64 °C", "a GPU without power readings just leaves them out"
    assert strip.notice.isHidden()
    assert "System RAM" in strip.ram_gauge.caption.text()


def test_gauges_follow_the_gpu_and_nvml_is_initialised_once(qtbot, fakes):
    gpu = fakes.FakeGpu(memory_used=2 * fakes.GB)
    nvml = fakes.FakeNvml([gpu])
    strip = make_strip(qtbot, nvml)
    qtbot.waitUntil(lambda: bool(strip._gpu_gauges) and strip._gpu_gauges[0].bar.text().startswith("2.00 GB"))

    gpu.memory_used = 9 * fakes.GB
    qtbot.waitUntil(lambda: strip._gpu_gauges[0].bar.text().startswith("9.00 GB"))
    reads_before = nvml.memory_reads
    qtbot.waitUntil(lambda: nvml.memory_reads >= reads_before + 3)

    assert nvml.init_calls == 1
    assert nvml.handle_lookups == 1, "device handles are looked up once and reused on every poll"
    strip.stop()
    assert nvml.shutdown_calls == 1


def test_no_driver_says_so_in_words_and_shows_ram(qtbot, fakes):
    strip = make_strip(qtbot, fakes.FakeNvml(driver=False))
    qtbot.waitUntil(lambda: strip.latest is not None)

    assert strip.notice.text() == NO_GPU_MESSAGE == "No NVIDIA GPU found — training runs on the CPU"
    assert not strip.notice.isHidden()
    assert strip._gpu_gauges == []
    assert strip.ram_gauge.bar.value() > 0
    assert " GB of " in strip.ram_gauge.bar.text()


def test_this_machine_without_nvidia_gpu_uses_the_real_nvml_binding(qtbot):
    strip = GpuStrip(interval_ms=FAST_POLL_MS)  # pynvml itself: no driver here, so it must report no GPU
    qtbot.addWidget(strip)
    strip.show()
    qtbot.waitUntil(lambda: strip.latest is not None)
    if strip.latest.gpus:  # pragma: no cover - only on a machine with an NVIDIA GPU
        assert strip.notice.isHidden()
    else:
        assert strip.notice.text() == NO_GPU_MESSAGE


def test_gpu_lost_mid_run_is_reported_and_the_strip_keeps_going(qtbot, fakes):
    gpu = fakes.FakeGpu()
    nvml = fakes.FakeNvml([gpu])
    strip = make_strip(qtbot, nvml)
    qtbot.waitUntil(lambda: len(strip._gpu_gauges) == 1)

    gpu.lost = True
    qtbot.waitUntil(lambda: "Lost contact with GPU 0" in strip.notice.text())
    assert "GPU is lost" in strip.notice.text()
    assert strip.latest.is_error
    assert strip._gpu_gauges == []
    polls = nvml.memory_reads
    qtbot.waitUntil(lambda: nvml.memory_reads > polls + 2)  # still polling, nothing raised

    gpu.lost = False
    qtbot.waitUntil(lambda: len(strip._gpu_gauges) == 1 and strip.notice.isHidden())


def test_a_slow_driver_does_not_stall_the_window(qtbot, fakes):
    """NVML answering in 300 ms (a struggling driver) must delay the gauges, not the event loop."""
    nvml = fakes.FakeNvml([fakes.FakeGpu()], delay_s=0.3)
    strip = make_strip(qtbot, nvml)
    ticks: list[int] = []
    clock = QElapsedTimer()
    clock.start()
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(clock.elapsed()))
    timer.start(10)
    qtbot.waitUntil(lambda: nvml.memory_reads >= 3, timeout=5000)
    timer.stop()

    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
    assert max(gaps) < 150, f"the GUI thread stalled for {max(gaps)} ms while NVML was slow"
    assert strip.latest is not None and len(strip._gpu_gauges) == 1


def test_on_a_multi_gpu_machine_the_training_gpu_is_marked_and_shown_first(qtbot, fakes, monkeypatch, tmp_path):
    """Three cards (FakeNvml: none are really here). CUDA_VISIBLE_DEVICES points torch at the last one on the PCI
    bus by UUID, so NVML's GPU 2 is the one the run uses."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc,GPU-aaaa")
    gpus = [fakes.FakeGpu(name="NVIDIA GeForce RTX 4070", uuid="GPU-aaaa-1", pci_bus_id="00000000:01:00.0"),
            fakes.FakeGpu(name="NVIDIA GeForce GTX 1060", uuid="GPU-bbbb-2", pci_bus_id="00000000:41:00.0"),
            fakes.FakeGpu(name="NVIDIA GeForce RTX 3090", uuid="GPU-cccc-3", pci_bus_id="00000000:81:00.0",
                          memory_total=24 * fakes.GB)]
    strip = make_strip(qtbot, fakes.FakeNvml(gpus))
    qtbot.waitUntil(lambda: len(strip._gpu_gauges) == 3)

    captions = [gauge.caption.text() for gauge in strip._gpu_gauges]
    assert captions == ["GPU 2 · NVIDIA GeForce RTX 3090", "GPU 0 · NVIDIA GeForce RTX 4070",
                        "GPU 1 · NVIDIA GeForce GTX 1060"]
    assert [gauge.details.text().startswith("Tailor trains here · ") for gauge in strip._gpu_gauges] == [
        True, False, False]
    assert strip._gpu_gauges[0].bar.text() == "3.00 GB of 24.0 GB"
    assert strip.latest.training_gpu.index == 2

    from app.core.gpu import DeviceIdentity

    strip.set_training_device(DeviceIdentity(pci_bus_id="0000:41:00.0"))  # the trainer's own report wins
    qtbot.waitUntil(lambda: strip._gpu_gauges[0].caption.text() == "GPU 1 · NVIDIA GeForce GTX 1060")
    assert strip._gpu_gauges[0].details.text() == "Tailor trains here · 57% busy · 64 °C · 120 W"
    strip.resize(1100, strip.sizeHint().height())
    assert strip.grab().save(str(tmp_path / "gpu-strip.png"))


def test_the_gpu_the_training_process_reports_is_the_one_marked(qtbot, fakes, open_window):
    """The training child names its CUDA device in its start event (it may see other CUDA_VISIBLE_DEVICES than the
    window); through the pipe's JSON and the training panel, the window's strip marks that GPU (FakeNvml)."""
    import json

    from app.core.training import StartEvent, event_from_dict, event_to_dict
    from app.core.gpu import GpuMonitor

    gpus = [fakes.FakeGpu(name="NVIDIA GeForce RTX 4070", uuid="GPU-aaaa-1", pci_bus_id="00000000:01:00.0"),
            fakes.FakeGpu(name="NVIDIA GeForce RTX 3090", uuid="GPU-cccc-3", pci_bus_id="00000000:81:00.0")]
    window = open_window(GpuMonitor(fakes.FakeNvml(gpus)))
    started = StartEvent(10, 0, 40, "cuda", 1000, 0, "bf16", gpu_uuid="cccc-3", gpu_pci_bus_id="0000:81:00.0")
    window.training_panel._on_event(event_from_dict(json.loads(json.dumps(event_to_dict(started)))))
    strip = window.gpu_strip
    qtbot.waitUntil(lambda: strip.latest.training_gpu is not None and strip.latest.training_gpu.index == 1, timeout=5000)
    assert strip._gpu_gauges[0].caption.text() == "GPU 1 · NVIDIA GeForce RTX 3090"
    assert strip._gpu_gauges[0].details.text().startswith("Tailor trains here")
    assert StartEvent(10, 0, 40, "cpu", 1000).gpu is None
