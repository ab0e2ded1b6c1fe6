"""The adapter library panel (being built: contract first)."""

from __future__ import annotations

from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import QVBoxLayout, QWidget

from app.core.library import Library


class LibraryPanel(QWidget):
    open_in_chat = Signal(str)

    def __init__(self, library: Library, parent: QWidget | None = None):
        super().__init__(parent)
        self.library = library
        QVBoxLayout(self)

    @Slot()
    def refresh(self) -> None:
        pass
