"""The PySide6 desktop app: widgets and the workers that bridge the Qt-free core to Qt."""
