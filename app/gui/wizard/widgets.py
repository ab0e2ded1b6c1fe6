"""Small widgets the wizard pages are built from: a path field, the token-length histogram, the masked example."""

from __future__ import annotations

import html
from typing import Callable, Sequence

from PySide6.QtCore import QSize, Qt
from PySide6.QtWidgets import QHBoxLayout, QLineEdit, QPushButton, QTextBrowser, QVBoxLayout, QWidget

from app.gui import settings
from app.gui.style import ACCENT, BAD, MASKED_TEXT, TRAINED_BACKGROUND, WARN

HISTOGRAM_BINS = 30


class PathField(QWidget):
    """A path box with a Browse… button; `browse` opens the right dialog and returns the choice ('' if cancelled)."""

    def __init__(self, placeholder: str, browse: Callable[[], str], parent: QWidget | None = None):
        super().__init__(parent)
        self.edit = QLineEdit()
        self.edit.setPlaceholderText(placeholder)
        self.edit.setClearButtonEnabled(True)
        self.button = QPushButton("Browse…")
        self.button.clicked.connect(self._browse)
        self._browse_for = browse
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit, 1)
        layout.addWidget(self.button)

    def text(self) -> str:
        return self.edit.text().strip()

    def _browse(self) -> None:
        chosen = self._browse_for()
        if chosen:
            settings.remember_folder_of(chosen)
            self.edit.setText(chosen)
            self.edit.editingFinished.emit()


def static_plot(left: str, bottom: str, whole_numbers_below: bool = False, left_axis_width: int | None = None):
    """A white plot for reading, not exploring: no mouse zoom or context menu to get lost in.

    whole_numbers_below: only whole-number ticks on the x axis (training steps have no 2.5).
    left_axis_width: fix the y axis's width, so plots stacked with a shared x axis line up.
    """
    import pyqtgraph as pg

    axes = {"bottom": _whole_number_axis(pg)} if whole_numbers_below else {}
    plot = pg.PlotWidget(background="w", axisItems=axes)
    if left_axis_width:
        plot.getAxis("left").setWidth(left_axis_width)
    plot.setLabel("left", left)
    plot.setLabel("bottom", bottom)
    plot.setMouseEnabled(x=False, y=False)
    plot.setMenuEnabled(False)
    plot.hideButtons()
    # No grid: redrawing its lines was most of the cost of each new point (~40 ms of a ~50 ms update).
    plot.showGrid(x=False, y=False)
    plot.getViewBox().setDefaultPadding(0.06)  # room for the top tick label
    plot.setAcceptDrops(False)
    return plot


def _whole_number_axis(pg):
    class WholeNumberAxis(pg.AxisItem):
        def tickValues(self, minVal, maxVal, size):
            return [(spacing, [value for value in values if float(value).is_integer()])
                    for spacing, values in super().tickValues(minVal, maxVal, size)]

    return WholeNumberAxis(orientation="bottom")


class LazyPlots(QWidget):
    """Plots built the first time they are shown: pyqtgraph and numpy take about half a second to import, which
    the window's first paint should not wait for. Data set before then is kept and drawn when they appear."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.built = False
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.setSpacing(4)

    def sizeHint(self) -> QSize:
        # pyqtgraph asks for 600x480; inside a scroll area that would push the page past the window's height.
        return QSize(420, 200)

    def showEvent(self, event) -> None:
        self.build_now()
        super().showEvent(event)

    def build_now(self) -> None:
        """Build the plots before they are shown, at a moment when a short pause goes unnoticed."""
        if not self.built:
            self.built = True
            self.build(self._layout)
            self.redraw()

    def changed(self) -> None:
        if self.built:
            self.redraw()

    def build(self, layout: QVBoxLayout) -> None:
        """Create the plots and add them to `layout`."""
        raise NotImplementedError

    def redraw(self) -> None:
        """Push the current data into the plots."""
        raise NotImplementedError


class TokenHistogram(LazyPlots):
    """How long the examples are in tokens, with the max length drawn across: bars past it get cut."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.lengths: list[int] = []
        self.max_len = 512

    def build(self, layout: QVBoxLayout) -> None:
        import pyqtgraph as pg

        self.plot = static_plot("examples", "tokens per example")
        self.kept = pg.BarGraphItem(x0=[], x1=[], height=[], brush=ACCENT, pen=pg.mkPen("w"))
        self.cut = pg.BarGraphItem(x0=[], x1=[], height=[], brush=WARN, pen=pg.mkPen("w"))
        self.limit = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen(BAD, width=2, style=Qt.PenStyle.DashLine),
                                     label="max length {value:.0f}",
                                     labelOpts={"position": 0.9, "color": BAD, "anchors": [(1, 0), (1, 0)]})
        for item in (self.kept, self.cut, self.limit):
            self.plot.addItem(item)
        layout.addWidget(self.plot)

    def show_lengths(self, lengths: Sequence[int], max_len: int) -> None:
        self.lengths = list(lengths)
        self.set_max_len(max_len)

    def set_max_len(self, max_len: int) -> None:
        self.max_len = max_len
        self.changed()

    def redraw(self) -> None:
        import numpy as np

        self.limit.setValue(self.max_len)
        if not self.lengths:
            for bars in (self.kept, self.cut):
                bars.setOpts(x0=[], x1=[], height=[])
            return
        top = max(max(self.lengths), self.max_len) * 1.05
        counts, edges = np.histogram(self.lengths, bins=HISTOGRAM_BINS, range=(0, top))
        # A bar counts as cut when its middle lies past the limit: close enough at this resolution.
        is_cut = (edges[:-1] + edges[1:]) / 2 > self.max_len
        for bars, mask in ((self.kept, ~is_cut), (self.cut, is_cut)):
            bars.setOpts(x0=edges[:-1][mask], x1=edges[1:][mask], height=counts[mask])
        self.plot.setXRange(0, top, padding=0)
        self.plot.setYRange(0, max(counts.max(), 1) * 1.1, padding=0)

    def cut_count(self) -> int:
        return sum(length > self.max_len for length in self.lengths)


class ExampleView(QTextBrowser):
    """One example as the model sees it: trained tokens highlighted, masked (context-only) tokens greyed."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setOpenLinks(False)
        self.setAcceptDrops(False)
        self.segments: list[tuple[str, bool]] = []

    def sizeHint(self) -> QSize:
        return QSize(420, 150)  # the splitter gives it the rest of the height; asking for less keeps pages unscrolled

    def show_segments(self, segments: Sequence[tuple[str, bool]]) -> None:
        self.segments = list(segments)
        pieces = []
        for text, trained in self.segments:
            escaped = html.escape(text)
            if trained:
                pieces.append(f'<span style="background:{TRAINED_BACKGROUND}; color:#1b3d17;">{escaped}</span>')
            else:
                pieces.append(f'<span style="color:{MASKED_TEXT};">{escaped}</span>')
        self.setHtml(f'<div style="white-space: pre-wrap; font-family: monospace;">{"".join(pieces)}</div>')


def legend_html() -> str:
    return (f'<span style="background:{TRAINED_BACKGROUND};">&nbsp;trained&nbsp;</span> the persona learns to write '
            f'these tokens &nbsp; <span style="color:{MASKED_TEXT};">masked</span> context only, no loss')
