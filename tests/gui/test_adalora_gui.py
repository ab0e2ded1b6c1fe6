"""AdaLoRA and the LoRA footprint in the desktop app: the wizard's Advanced section offers AdaLoRA with plain-words
tooltips, the review page shows peft's own numbers against a full fine-tune, and the library charts where an AdaLoRA
persona's rank budget went. Real widgets offscreen, the tiny 4-bit model, screenshots under the test's tmp_path."""

from __future__ import annotations

import time

import pytest
from PySide6.QtCore import Qt

from app.core.adalora import get_adalora_model, save_as_lora
from app.core.config import DataSettings, LoraSettings, RunConfig
from app.core.footprint import footprint
from app.core.library import LIBRARY_VERSION, MANIFEST_NAME, write_json_atomic
from app.gui.library_panel import LibraryPanel

LOAD_TIMEOUT_MS = 60_000
KEPT = [1, 2, 1, 2, 1, 2, 1, 6, 7, 8, 6, 7, 8, 6]
"""Surviving ranks of the tiny Llama's 14 adapted modules, in peft's module order (7 per layer)."""


def click(qtbot, widget) -> None:
    qtbot.mouseClick(widget, Qt.MouseButton.LeftButton)


def reach_adapter_page(qtbot, wizard, tiny_base, dataset) -> None:
    page = wizard.model_page
    page.folder_field.edit.setText(str(tiny_base))
    qtbot.keyClick(page.folder_field.edit, Qt.Key.Key_Return)
    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: wizard.current_index == 1, timeout=LOAD_TIMEOUT_MS)
    wizard.data_page.path_field.edit.setText(str(dataset))
    qtbot.keyClick(wizard.data_page.path_field.edit, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: wizard.context.dataset is not None and not wizard.data_page.is_busy,
                    timeout=LOAD_TIMEOUT_MS)
    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: wizard.current_index == 2)


def test_adalora_in_the_wizard_and_the_footprint_on_the_review(qtbot, open_window, no_gpu_monitor, tiny_base,
                                                              chat_jsonl, tmp_path):
    wizard = open_window(no_gpu_monitor).wizard
    reach_adapter_page(qtbot, wizard, tiny_base, chat_jsonl)
    page = wizard.adapter_page
    click(qtbot, page.advanced_toggle)
    assert not page.init_r.isEnabled(), "AdaLoRA's settings wait until AdaLoRA is chosen"
    page.use_dora.setChecked(True)
    page.method.setCurrentIndex(page.method.findData("adalora"))
    assert page.init_r.isEnabled() and page.target_r.isEnabled() and not page.rank.isEnabled()
    assert not page.use_dora.isChecked() and not page.use_dora.isEnabled(), "AdaLoRA cannot be combined with DoRA"
    assert "pruned until the layers average target_r" in page.method.toolTip()
    for widget in (page.init_r, page.target_r, page.tinit, page.tfinal, page.delta_t):
        assert len(widget.toolTip()) > 40, f"{widget!r} has no plain-words tooltip"
    page.init_r.setValue(12)
    page.target_r.setValue(6)
    page.max_steps.setValue(4)
    lora = page.choices().lora
    assert (lora.method, lora.init_r, lora.target_r) == ("adalora", 12, 6)

    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: wizard.current_index == 3)
    review = wizard.review_page
    qtbot.waitUntil(lambda: review.footprint is not None, timeout=LOAD_TIMEOUT_MS)
    expected = footprint(wizard.build_config(), device=review.device())
    assert review.footprint.trainable_params == expected.trainable_params
    assert review.footprint_table.rowCount() == 3
    assert review.footprint_table.item(0, 1).text() == f"{expected.trainable_params:,}"
    assert review.footprint_table.item(1, 1).text().startswith("≤ ")
    assert "upper bound" in review.footprint_note.text()
    summary = [review.summary.itemAt(row, review.summary.ItemRole.FieldRole).widget().text()
               for row in range(review.summary.rowCount())]
    assert any(text.startswith("AdaLoRA, rank 12 pruned to an average of 6") for text in summary)
    wizard.grab().save(str(tmp_path / "review-adalora.png"))


@pytest.fixture
def adalora_library(library, tiny_base):
    """A converted AdaLoRA persona in the library, its pruning made deterministic: layer 0's modules keep 1-2 ranks,
    layer 1's keep 6-8, as if the persona needed the later layer more."""
    import torch

    from app.core.models import load_model

    config = RunConfig(name="ada", data=DataSettings(path="unused.jsonl"),
                       lora=LoraSettings(method="adalora", init_r=8, target_r=4))
    model = get_adalora_model(load_model(tiny_base, "4bit", "cpu"), config, 10)
    with torch.no_grad():
        for index, module in enumerate(m for m in model.modules() if "default" in getattr(m, "lora_E", {})):
            values = module.lora_E["default"]
            values.zero_()
            values[: KEPT[index]] = 0.5
    with library.staging() as staged:
        allocation = save_as_lora(model, staged)
        write_json_atomic(staged / MANIFEST_NAME, {"library_version": LIBRARY_VERSION, "name": "ada", "kind": "trained",
                                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        library.publish(staged, "ada")
    return library, allocation


def test_library_details_chart_the_final_rank_of_each_layer(qtbot, adalora_library, tmp_path):
    library, allocation = adalora_library
    panel = LibraryPanel(library)
    qtbot.addWidget(panel)
    panel.resize(1280, 760)
    panel.show()
    panel.select("ada")
    chart = panel.details.rank_chart
    qtbot.waitUntil(chart.isVisible)
    assert chart.allocation == allocation
    bars = chart.bars.opts
    assert list(bars["x"]) == [0, 1]
    assert list(bars["height"]) == pytest.approx([sum(KEPT[:7]) / 7, sum(KEPT[7:]) / 7])
    assert sorted(allocation.final_ranks.values()) == sorted(KEPT)
    assert chart.target_line.value() == 4
    assert "started at 8" in chart.caption.text() and "rank 8" in chart.caption.text()
    qtbot.wait(200)  # let the splitter lay the chart out before the screenshot
    panel.grab().save(str(tmp_path / "library-adalora.png"))

    panel.select(None)
    assert not chart.isVisible()
