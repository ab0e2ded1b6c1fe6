"""The desktop app (PySide6): main window, training wizard, training panel, GPU strip, and the workers that keep
the core's slow work off the GUI thread. Nothing here imports torch; the core does that lazily, on worker threads."""
