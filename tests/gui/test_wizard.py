"""The training wizard, driven like a user would: real widgets, real files, the tiny model, real training."""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication

from app.core.catalogue import find_entry
from app.core.config import DataSettings, LoraSettings, ModelSource, RunConfig, TrainingSettings
from app.core.estimate import FITS, WONT_FIT
from app.core.gpu import GpuMonitor
from app.gui.style import TRAINED_BACKGROUND
from app.gui.training_panel import FINISHED
from app.gui.wizard.data_page import FIRST_SAMPLE

LOAD_TIMEOUT_MS = 60_000
TRAIN_TIMEOUT_MS = 180_000


def type_into(qtbot, line_edit, text: str) -> None:
    line_edit.clear()
    qtbot.keyClicks(line_edit, text)
    qtbot.keyClick(line_edit, Qt.Key.Key_Return)


def click(qtbot, button) -> None:
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def choose_folder_model(qtbot, wizard, folder: Path) -> None:
    page = wizard.model_page
    type_into(qtbot, page.folder_field.edit, str(folder))
    assert page.folder.isChecked()
    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: wizard.current_index == 1, timeout=LOAD_TIMEOUT_MS)


def choose_dataset(qtbot, wizard, path: Path) -> None:
    type_into(qtbot, wizard.data_page.path_field.edit, str(path))
    qtbot.waitUntil(lambda: wizard.context.dataset is not None and wizard.context.dataset.path == str(path)
                    and not wizard.data_page.is_busy, timeout=LOAD_TIMEOUT_MS)


def reach_adapter_page(qtbot, wizard, tiny_base, dataset: Path) -> None:
    choose_folder_model(qtbot, wizard, tiny_base)
    choose_dataset(qtbot, wizard, dataset)
    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: wizard.current_index == 2)


def test_wizard_trains_a_persona_from_start_to_finish(qtbot, open_window, library, tiny_base, chat_jsonl):
    window = open_window()
    wizard, panel = window.wizard, window.training_panel

    choose_folder_model(qtbot, wizard, tiny_base)
    assert wizard.model_page.info_architecture.text() == "llama"
    choose_dataset(qtbot, wizard, chat_jsonl)
    assert len(wizard.data_page.editor.model.rows) == 16
    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: wizard.current_index == 2)

    adapter = wizard.adapter_page
    assert adapter.name.text() == "persona", "the name is proposed from the dataset's file name"
    assert adapter.quant.currentData() == "auto", "16-bit when it fits comfortably, else 4-bit"
    adapter.quant.setCurrentIndex(adapter.quant.findData("4bit"))  # real NF4 training through the whole app
    light = next(button for button in adapter.rank_presets.buttons() if button.text() == "Light 8")
    click(qtbot, light)
    adapter.batch_size.setValue(4)
    adapter.max_len.setValue(128)
    click(qtbot, adapter.advanced_toggle)
    adapter.max_steps.setValue(4)
    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: wizard.current_index == 3)

    review = wizard.review_page
    assert review.estimate is not None and review.verdict == FITS
    assert wizard.next_button.text() == "Train"
    click(qtbot, wizard.next_button)

    assert window.train_stack.currentWidget() is panel
    qtbot.waitUntil(lambda: panel.state == FINISHED and not panel.is_running, timeout=TRAIN_TIMEOUT_MS)
    entry = library.get("persona")
    assert entry.ok
    assert entry.manifest["steps"] == 4
    assert entry.manifest["config"]["lora"]["rank"] == 8
    assert entry.manifest["config"]["training"]["batch_size"] == 4
    assert entry.manifest["config"]["model"]["quant"] == "4bit"
    steps, losses = panel.chart.raw_curve.getData()
    assert len(steps) >= 1 and steps[-1] == 4, "the chart received the run's steps"
    assert len(panel.chart.smooth_curve.getData()[1]) == len(losses)
    assert panel.tiles["step"].value.text() == "4 / 4"

    assert panel.chat_button.isVisible() and panel.chat_button.text() == "Chat with persona"
    click(qtbot, panel.chat_button)
    assert window.tabs.currentWidget() is window.chat_pane


def test_a_newcomer_can_press_next_through_every_page(qtbot, open_window):
    """Bundled SmolLM2 and the pirate sample are picked already: Next, Next, Next reaches a runnable review."""
    window = open_window()
    wizard = window.wizard
    assert wizard.model_page.bundled.isChecked()
    assert wizard.data_page.path_field.text().endswith(FIRST_SAMPLE)

    for page_index in (1, 2, 3):
        click(qtbot, wizard.next_button)
        qtbot.waitUntil(lambda expected=page_index: wizard.current_index == expected, timeout=LOAD_TIMEOUT_MS)
        if page_index == 2:
            assert wizard.context.dataset.report.rows > 0

    config = wizard.build_config()
    assert config.model.base == "default" and config.model.quant == "auto"
    assert Path(config.data.path).name == FIRST_SAMPLE
    assert config.name == "pirate"
    assert wizard.review_page.verdict
    # The bundled 135M model fits comfortably in 16 bits on any PC Tailor runs on; the review says so and why.
    summary = wizard.review_page.summary
    base_row = next(summary.itemAt(row, summary.ItemRole.FieldRole).widget().text() for row in range(summary.rowCount())
                    if summary.itemAt(row, summary.ItemRole.LabelRole).widget().text() == "Base model:")
    assert "16-bit LoRA, chosen automatically" in base_row and "GB of RAM free" in base_row


def test_catalogue_models_show_their_size_before_any_download(qtbot, open_window):
    window = open_window()
    page = window.wizard.model_page
    entry = find_entry("qwen2.5-0.5b")
    page.catalogue_combo.setCurrentIndex(page.catalogue_combo.findData(entry.key))

    assert page.catalogue.isChecked()
    assert page.source() == "qwen2.5-0.5b"
    assert page.info_name.text() == "Qwen2.5 0.5B Instruct"
    assert page.info_architecture.text() == "qwen2"
    assert page.info_parameters.text().startswith("494M")
    assert page.info_context.text() == "32,768 tokens"
    assert page.info_vram.text().startswith("≈ ") and page.info_vram.text().endswith(" GB")
    assert "VRAM with QLoRA" in page.catalogue_combo.currentText()
    assert not page.is_busy, "choosing a catalogue model downloads nothing until Next"


def test_bad_model_choices_explain_themselves_on_the_page(qtbot, open_window, tmp_path):
    window = open_window()
    wizard, page = window.wizard, window.wizard.model_page

    not_a_model = tmp_path / "holiday-photos"
    not_a_model.mkdir()
    type_into(qtbot, page.folder_field.edit, str(not_a_model))
    qtbot.waitUntil(lambda: page.banner.isVisible() and not page.is_busy, timeout=LOAD_TIMEOUT_MS)
    assert "not a model folder (no config.json)" in page.banner.plain_text
    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: not page.is_busy, timeout=LOAD_TIMEOUT_MS)
    assert wizard.current_index == 0

    page.hub.setChecked(True)
    click(qtbot, wizard.next_button)
    assert "Type a hub id" in page.banner.plain_text

    type_into(qtbot, page.hub_edit, "nobody-here/no-such-model")
    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: not page.is_busy and page.banner.isVisible(), timeout=LOAD_TIMEOUT_MS)
    assert wizard.current_index == 0
    assert "no-such-model" in page.banner.plain_text
    assert "Traceback" not in page.banner.plain_text


def test_broken_dataset_lines_are_listed_by_number(qtbot, open_window, tiny_base, tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy!"}]}
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([
        json.dumps(good),
        json.dumps(good),
        '{"messages": [{"role": "user", "content": "unfinished"',
        json.dumps(good),
        json.dumps({"messages": [{"role": "user", "content": "Nobody answers"}]}),
    ]) + "\n")
    window = open_window()
    wizard = window.wizard
    choose_folder_model(qtbot, wizard, tiny_base)
    page = wizard.data_page
    qtbot.waitUntil(lambda: not page.is_busy, timeout=LOAD_TIMEOUT_MS)

    type_into(qtbot, page.path_field.edit, str(broken))
    qtbot.waitUntil(lambda: page.banner.isVisible() and not page.is_busy, timeout=LOAD_TIMEOUT_MS)
    assert "broken.jsonl line 3: not valid JSON" in page.banner.plain_text
    assert wizard.context.dataset is None
    assert page.table.rowCount() == 0 and page.editor.model.rowCount() == 0

    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text("\n".join(json.dumps(row) for row in (
        good, good, {"messages": [{"role": "user", "content": "Nobody answers"}]})) + "\n")
    type_into(qtbot, page.path_field.edit, str(fixed))
    qtbot.waitUntil(lambda: page.banner.isVisible() and not page.is_busy, timeout=LOAD_TIMEOUT_MS)
    assert "fixed.jsonl line 3: no assistant reply to learn from" in page.banner.plain_text

    click(qtbot, wizard.next_button)
    assert wizard.current_index == 1, "Next stays on a page whose dataset has problems"


def test_dropping_a_file_on_the_page_loads_it(qtbot, open_window, tiny_base, chat_jsonl):
    window = open_window()
    wizard = window.wizard
    choose_folder_model(qtbot, wizard, tiny_base)
    page = wizard.data_page
    qtbot.waitUntil(lambda: not page.is_busy, timeout=LOAD_TIMEOUT_MS)

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(chat_jsonl))])
    enter = QDragEnterEvent(QPoint(50, 50), Qt.DropAction.CopyAction, mime, Qt.MouseButton.NoButton,
                            Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(page, enter)
    assert enter.isAccepted()
    drop = QDropEvent(QPointF(50, 50), Qt.DropAction.CopyAction, mime, Qt.MouseButton.NoButton,
                      Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(page, drop)

    assert page.path_field.text() == str(chat_jsonl)
    qtbot.waitUntil(lambda: wizard.context.dataset is not None and wizard.context.dataset.path == str(chat_jsonl),
                    timeout=LOAD_TIMEOUT_MS)


def test_format_and_columns_can_be_overridden(qtbot, open_window, tiny_base, chat_jsonl, tmp_path):
    window = open_window()
    wizard = window.wizard
    choose_folder_model(qtbot, wizard, tiny_base)
    page = wizard.data_page
    choose_dataset(qtbot, wizard, chat_jsonl)
    assert page.detected.text() == "detected: OpenAI chat (messages)"

    page.set_format("text")
    qtbot.waitUntil(lambda: page.banner.isVisible() and not page.is_busy, timeout=LOAD_TIMEOUT_MS)
    assert "plain-text format needs a 'text' column" in page.banner.plain_text
    page.set_format("auto")
    qtbot.waitUntil(lambda: wizard.context.dataset is not None and not page.is_busy, timeout=LOAD_TIMEOUT_MS)

    table = tmp_path / "qa.csv"
    table.write_text("question,answer,pirate_answer\n"
                     "What is rain?,Water falling from clouds.,Arr the sky be weepin'!\n"
                     "Name a planet.,Mars.,The red rock o' Mars!\n")
    choose_dataset(qtbot, wizard, table)
    assert not page.columns_row.isHidden()
    assert any("Water falling" in text for text, trained in page.example.segments if trained)

    assert (page.prompt_column.currentText(), page.response_column.currentText()) == ("question", "answer")
    page.response_column.setCurrentIndex(page.response_column.findText("pirate_answer"))
    page.response_column.activated.emit(page.response_column.currentIndex())
    qtbot.waitUntil(lambda: wizard.context.dataset is not None and not page.is_busy
                    and wizard.context.dataset.response_column == "pirate_answer", timeout=LOAD_TIMEOUT_MS)
    assert any("weepin" in text for text, trained in page.example.segments if trained)


def test_histogram_and_masked_example_follow_the_dataset(qtbot, open_window, tiny_base, chat_jsonl):
    window = open_window()
    wizard = window.wizard
    choose_folder_model(qtbot, wizard, tiny_base)
    choose_dataset(qtbot, wizard, chat_jsonl)
    page = wizard.data_page

    lengths = wizard.context.dataset.report.token_lengths
    assert len(lengths) == 16 and page.histogram.lengths == lengths
    assert page.histogram.cut_count() == 0
    wizard.adapter_page.max_len.setValue(32)
    assert page.histogram.max_len == 32
    assert page.histogram.cut_count() == sum(length > 32 for length in lengths) > 0
    assert "longer than the max length (32) will be cut" in page.summary.text()

    trained = "".join(text for text, is_trained in page.example.segments if is_trained)
    masked = "".join(text for text, is_trained in page.example.segments if not is_trained)
    assert "Arr matey!" in trained and "What is the sun?" in masked
    assert TRAINED_BACKGROUND in page.example.toHtml()


def test_adapter_page_refuses_bad_settings_with_a_message(qtbot, open_window, library, tiny_base, chat_jsonl,
                                                          tiny_run):
    from app.core.training import run_training

    run_training(tiny_run(name="taken"), library)
    window = open_window()
    wizard = window.wizard
    reach_adapter_page(qtbot, wizard, tiny_base, chat_jsonl)
    page = wizard.adapter_page

    for name, expected in (("../escape", "is not a usable adapter name"),
                           ("taken", "already has an adapter called 'taken'")):
        page.name.setText(name)
        click(qtbot, wizard.next_button)
        assert wizard.current_index == 2
        assert expected in page.banner.plain_text

    page.name.setText("fresh")
    page.learning_rate.setText("fast please")
    click(qtbot, wizard.next_button)
    assert "'fast please' is not a learning rate" in page.banner.plain_text
    page.learning_rate.setText("2e-4")
    click(qtbot, wizard.next_button)
    assert wizard.current_index == 3


def test_rank_presets_set_rank_and_alpha_and_every_setting_explains_itself(qtbot, open_window):
    page = open_window().wizard.adapter_page
    strong = next(button for button in page.rank_presets.buttons() if button.text() == "Strong 64")
    click(qtbot, strong)
    assert (page.rank.value(), page.alpha.value()) == (64, 128)
    assert strong.isChecked()
    page.rank.setValue(12)
    assert not any(button.isChecked() for button in page.rank_presets.buttons())

    assert "Size r of the low-rank" in page.rank.toolTip()
    assert "magnitude per output channel" in page.use_dora.toolTip()
    for widget in (page.alpha, page.targets, page.quant, page.epochs, page.learning_rate, page.batch_size,
                   page.max_len, page.use_rslora, page.dropout, page.grad_accum, page.gradient_checkpointing):
        assert len(widget.toolTip()) > 20, f"{widget!r} has no tooltip"


def test_review_weighs_the_estimate_against_free_vram_and_auto_fit_makes_it_fit(qtbot, open_window, fakes,
                                                                                 tiny_base, chat_jsonl):
    nvml = fakes.FakeNvml([fakes.FakeGpu(memory_total=8 * fakes.GB, memory_used=2 * fakes.GB)])
    window = open_window(GpuMonitor(nvml))
    wizard = window.wizard
    reach_adapter_page(qtbot, wizard, tiny_base, chat_jsonl)
    adapter = wizard.adapter_page
    adapter.batch_size.setValue(64)
    # Long enough that even checkpointing cannot save it (the loss, a slice of tokens at a time, no longer grows with
    # the batch: 64 x 4096 tokens now fit in 6 GB with checkpointing).
    adapter.max_len.setValue(16384)
    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: wizard.current_index == 3)

    review = wizard.review_page
    assert review.device() == "cuda"
    assert review.available_memory() == 6 * fakes.GB
    assert review.verdict == WONT_FIT
    assert review.verdict_label.text().count("Won't fit") == 1
    assert review.breakdown.rowCount() == len(review.estimate.rows()) + 2

    click(qtbot, review.auto_fit_button)
    assert review.verdict == FITS
    assert adapter.batch_size.value() < 64
    assert adapter.batch_size.value() * adapter.grad_accum.value() == 64, "the effective batch is kept"
    assert adapter.gradient_checkpointing.currentData() == (True, 1), "a smaller batch comes after every block"
    assert review.changes.text().startswith("Auto-fit: ")
    assert review.estimate.total < 0.85 * 6 * fakes.GB


def test_checkpointing_every_other_block_reaches_the_config_and_the_estimate(qtbot, open_window, no_gpu_monitor,
                                                                            tiny_base, chat_jsonl):
    wizard = open_window(no_gpu_monitor).wizard
    reach_adapter_page(qtbot, wizard, tiny_base, chat_jsonl)
    adapter = wizard.adapter_page
    labels = [adapter.gradient_checkpointing.itemText(i) for i in range(adapter.gradient_checkpointing.count())]
    adapter.gradient_checkpointing.setCurrentIndex(labels.index("On, every other block (faster, more memory)"))
    training = adapter.choices().training
    assert (training.gradient_checkpointing, training.checkpoint_every_n_layers) == (True, 2)
    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: wizard.current_index == 3)
    review = wizard.review_page
    assert (review.estimate.gradient_checkpointing, review.estimate.checkpoint_every_n_layers) == (True, 2)
    shown = [review.breakdown.item(row, 0).text() for row in range(review.breakdown.rowCount())]
    assert "Saved activations (gradient checkpointing every other block)" in shown

    # A run repeated from the command line's settings keeps an interval the menu does not offer.
    repeated = RunConfig(name="again", data=DataSettings(path=str(chat_jsonl)),
                         training=TrainingSettings(gradient_checkpointing=True, checkpoint_every_n_layers=3))
    adapter.restore(repeated)
    assert adapter.gradient_checkpointing.currentText() == "On, every 3rd block"
    assert adapter.choices().training.checkpoint_every_n_layers == 3


def test_every_part_of_a_cpu_estimate_is_listed_and_drawn(qtbot, open_window, no_gpu_monitor, tiny_base, chat_jsonl):
    """On the CPU the estimate has a part more than on a GPU (the model file); the table and the bar show them all."""
    from app.gui.wizard.review_page import SEGMENT_COLOURS

    wizard = open_window(no_gpu_monitor).wizard
    reach_adapter_page(qtbot, wizard, tiny_base, chat_jsonl)
    click(qtbot, wizard.next_button)
    qtbot.waitUntil(lambda: wizard.current_index == 3)
    review = wizard.review_page
    assert review.device() == "cpu"
    rows = review.estimate.rows()
    assert len(rows) <= len(SEGMENT_COLOURS)
    for row, (label, _amount) in enumerate(rows):
        assert review.breakdown.item(row, 0).text() == label and review.breakdown.item(row, 1).text()


def test_adapter_page_starts_at_the_same_defaults_as_tailor_train(qtbot, open_window):
    """The wizard and the CLI share one default recipe: the adapter page's untouched fields build exactly the
    dataclass defaults (docs/recipe.md says how they were chosen)."""
    page = open_window().wizard.adapter_page
    page.name.setText("fresh")
    choices = page.choices()
    assert choices.lora == LoraSettings()
    assert choices.training == TrainingSettings()
    assert (choices.quant, choices.max_len, choices.packing) == (ModelSource().quant, DataSettings(path="-").max_len,
                                                                 DataSettings(path="-").packing)
