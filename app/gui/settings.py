"""What the app remembers between sessions: window geometry, the last run's choices, the last folder browsed.

Always an INI file (not the Windows registry or a macOS plist) so a user can read or delete it, and so tests can
point QSettings at a temporary folder with `QSettings.setPath`.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings

ORGANISATION = "Tailor"
APPLICATION = "Tailor"

GEOMETRY = "window/geometry"
WINDOW_STATE = "window/state"
CURRENT_TAB = "window/tab"
LAST_RUN = "wizard/last_run"
"""The last RunConfig the user trained with, as JSON: the wizard starts from it next time."""
LAST_FOLDER = "wizard/last_folder"


def settings() -> QSettings:
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORGANISATION, APPLICATION)


def read_text(key: str, default: str = "") -> str:
    value = settings().value(key, default)
    return value if isinstance(value, str) else default


def write_text(key: str, value: str) -> None:
    settings().setValue(key, value)


def read_bytes(key: str) -> QByteArray | None:
    value = settings().value(key)
    return value if isinstance(value, QByteArray) and not value.isEmpty() else None


def write_bytes(key: str, value: QByteArray) -> None:
    settings().setValue(key, value)


def last_folder() -> str:
    """Where file dialogs open: the folder of the last file picked, or the home folder."""
    folder = read_text(LAST_FOLDER)
    return folder if folder and Path(folder).is_dir() else str(Path.home())


def remember_folder_of(path: str) -> None:
    chosen = Path(path)
    write_text(LAST_FOLDER, str(chosen if chosen.is_dir() else chosen.parent))
