"""The core must work without Qt. `make test` runs this folder with TAILOR_BLOCK_QT=1, which makes any import of
PySide6 fail, so a stray Qt import in app/core fails the suite instead of going unnoticed."""

import os
import sys

if os.environ.get("TAILOR_BLOCK_QT") == "1":
    for name in ("PySide6", "shiboken6", "pyqtgraph"):
        sys.modules[name] = None  # type: ignore[assignment]
