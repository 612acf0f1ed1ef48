"""The PySide6 desktop app (`edgegen app`): widgets wired to the Qt-free runtime in app.runtime."""
