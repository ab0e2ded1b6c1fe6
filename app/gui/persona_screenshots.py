"""Screenshots of the persona side of the app for the docs: the library, a chat, a comparison and the mixer.

`save_persona_screenshots(outdir, library)` drives the real widgets against the given library: it opens up to two of
its adapters in chat on the base they were trained on, asks them real questions (replies are generated, not made
up), compares them with the bare base, and sets up a mix of the two. It needs a QApplication and takes a minute or
two on a CPU with the bundled model. Standalone: `python -m app.gui.persona_screenshots OUTDIR LIBRARY`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from app.core.chat import BASE
from app.core.library import Library

SIZE = (1280, 800)
REPLY_TOKENS = 60
MODEL_TIMEOUT_S = 600
CHAT_QUESTIONS = ("Hello! Who are you?", "What should I cook tonight?")
COMPARE_QUESTION = "Give me one tip for a rainy day."


def save_persona_screenshots(outdir: str | Path, library: Library) -> list[Path]:
    """Write library.png, chat.png, compare.png and mixer.png into `outdir`; returns their paths."""
    from PySide6.QtWidgets import QApplication

    from app.gui.chat_pane import ChatPane
    from app.gui.chat_worker import loaded_base
    from app.gui.library_panel import LibraryPanel
    from app.gui.screenshots import wait_until

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    usable = [entry for entry in library.entries() if entry.ok]
    personas = [entry.name for entry in usable if entry.kind != "mix"][:2] or [entry.name for entry in usable][:2]
    saved: list[Path] = []

    def shot(name: str, widget) -> None:
        QApplication.processEvents()
        path = out / name
        widget.grab().save(str(path))
        saved.append(path)

    panel = LibraryPanel(library)
    pane = ChatPane(library)
    try:
        for widget in (panel, pane):
            widget.resize(*SIZE)
            widget.show()
        pane.max_tokens.setValue(REPLY_TOKENS)

        def replies_done() -> bool:
            return not pane.pending

        for name in personas:
            pane.open_persona(name)
        if personas:
            pane.select_persona(personas[0])
        for question in CHAT_QUESTIONS:
            pane.input.setPlainText(question)
            pane.send()
            wait_until(replies_done, MODEL_TIMEOUT_S, "a chat reply")
        shot("chat.png", pane)

        choices = [BASE, *personas]
        for combo, choice in zip(pane.compare_choices, choices):
            combo.setCurrentIndex(combo.findData(choice))
        pane.compare_prompt.setText(COMPARE_QUESTION)
        pane.compare()
        pane.tabs.setCurrentIndex(1)
        wait_until(replies_done, MODEL_TIMEOUT_S, "the comparison")
        shot("compare.png", pane)

        pane.tabs.setCurrentWidget(pane.mixer)
        if len(personas) == 2:
            pane.mixer.set_parents({personas[0]: 0.7, personas[1]: 0.3})
            pane.mixer.name_edit.setText(library.unique_name(f"{personas[0]} x {personas[1]}"[:60]))
        shot("mixer.png", pane)

        # By now the chat has published its base, so the fit column is filled in.
        wait_until(lambda: loaded_base().profile is not None, MODEL_TIMEOUT_S, "the base model")
        with_curve = next((entry.name for entry in usable if entry.training_log()), usable[0].name if usable else None)
        panel.select(with_curve)
        shot("library.png", panel)
    finally:
        pane.shutdown()
        panel.close()
        pane.close()
    return saved


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m app.gui.persona_screenshots OUTDIR LIBRARY", file=sys.stderr)
        return 2
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    from app.gui.style import apply_style

    app = QApplication(sys.argv[:1])
    apply_style(app)
    for path in save_persona_screenshots(argv[0], Library(argv[1])):
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
