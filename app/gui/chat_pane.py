"""The chat pane (being built: contract first)."""

from __future__ import annotations

from PySide6.QtCore import Slot
from PySide6.QtWidgets import QVBoxLayout, QWidget

from app.core.library import Library


class ChatPane(QWidget):
    def __init__(self, library: Library, parent: QWidget | None = None):
        super().__init__(parent)
        self.library = library
        QVBoxLayout(self)

    @Slot(str)
    def open_persona(self, name: str) -> None:
        pass

    @Slot(bool)
    def set_training_active(self, active: bool) -> None:
        pass

    def shutdown(self) -> None:
        pass
