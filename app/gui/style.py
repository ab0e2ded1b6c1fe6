"""The app's look (Fusion with a light palette and a short style sheet) and the few text formats every panel shares."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtGui import QColor, QIcon, QPalette
from PySide6.QtWidgets import QApplication

from app.core.estimate import GB

ICON_PATH = Path(__file__).resolve().parents[2] / "resources" / "icons" / "tailor.svg"

ACCENT = "#2f6fba"
GOOD = "#2e8540"
WARN = "#b7791f"
BAD = "#c0392b"
MUTED = "#6b7280"
TRAINED_BACKGROUND = "#d7f0d2"
MASKED_TEXT = "#9aa0a6"

# Object names select these rules, so a widget opts in by name rather than each panel repeating colours.
STYLE_SHEET = f"""
QLabel#pageTitle {{ font-size: 17px; font-weight: 600; }}
QLabel#pageSubtitle {{ color: {MUTED}; }}
QLabel#stepLabel {{ color: {MUTED}; padding: 4px 10px; border-radius: 11px; }}
QLabel#stepLabel[current="true"] {{ color: white; background: {ACCENT}; }}
QLabel#statCaption {{ color: {MUTED}; font-size: 11px; }}
QLabel#statValue {{ font-size: 15px; font-weight: 600; }}
QLabel#muted {{ color: {MUTED}; }}
QFrame#banner {{ border-radius: 6px; padding: 2px; }}
QFrame#banner[tone="error"] {{ background: #fdecea; border: 1px solid #f5c6c0; }}
QFrame#banner[tone="warning"] {{ background: #fff7e0; border: 1px solid #f2d58a; }}
QFrame#banner[tone="info"] {{ background: #e8f1fb; border: 1px solid #bcd4f0; }}
QFrame#banner[tone="success"] {{ background: #e7f5ea; border: 1px solid #b5dfbf; }}
QFrame#gauge {{ background: #f6f7f9; border: 1px solid #dde1e6; border-radius: 6px; }}
QFrame#statTile {{ background: #f6f7f9; border: 1px solid #e3e6ea; border-radius: 6px; }}
QPushButton#primary {{ background: {ACCENT}; color: white; border: 1px solid #245a99; border-radius: 4px;
                      padding: 5px 16px; font-weight: 600; }}
QPushButton#primary:disabled {{ background: #9db7d8; border-color: #9db7d8; }}
QPushButton#preset:checked {{ background: {ACCENT}; color: white; }}
"""


def apply_style(app: QApplication, style_sheet: bool = True) -> None:
    """Fusion, the palette, the icon and (unless told to wait) the style sheet.

    A style sheet makes every widget's polish slower, most of all when a widget is re-parented into a layout; so
    the app sets it once its window is built (style_sheet=False here, then apply_style_sheet), which re-polishes
    each widget once instead of at every step of the building.
    """
    app.setStyle("Fusion")
    palette = app.palette()
    palette.setColor(QPalette.ColorRole.Window, QColor("#fbfbfc"))
    palette.setColor(QPalette.ColorRole.Highlight, QColor(ACCENT))
    app.setPalette(palette)
    app.setWindowIcon(app_icon())
    if style_sheet:
        apply_style_sheet(app)


def apply_style_sheet(app: QApplication) -> None:
    app.setStyleSheet(STYLE_SHEET)


def app_icon() -> QIcon:
    return QIcon(str(ICON_PATH))


def gigabytes(amount: int | float) -> str:
    return f"{amount / GB:.2f} GB" if amount < 10 * GB else f"{amount / GB:.1f} GB"


def duration(seconds: float) -> str:
    """'0:42', '12:05', '1:02:09': a clock, because training times run from seconds to hours."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def parameter_count(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


def repolish(widget) -> None:
    """Re-apply the style sheet after a dynamic property used in a selector changed."""
    widget.style().unpolish(widget)
    widget.style().polish(widget)
