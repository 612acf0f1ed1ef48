"""`python -m tools.screenshots`: PNGs of the app's main states (empty, generating, result, gallery) for the docs.

Runs the real window on a real bundle in a scratch folder (the user's gallery and settings are untouched);
offscreen unless a display is wanted. Images are drawn with fixed seeds so reruns match.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

PROMPTS = (
    "a red circle on a blue background",
    "green triangle at the top of a white background",
    "a yellow square on the left of a purple background",
    "a blue circle on the right of an orange background",
)


def take(bundle: Path, out: Path, width: int, height: int, size: int | None, steps: int | None,
         scheme: str) -> list[Path]:
    from PySide6.QtCore import QEventLoop, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    from app.ui.main import dispose
    from app.ui.settings import AppPaths, Settings, save_settings
    from app.ui.theme import apply_theme
    from app.ui.window import MainWindow

    app = QApplication.instance() or QApplication(["edgegen-screenshots"])
    apply_theme(app, {"dark": Qt.ColorScheme.Dark, "light": Qt.ColorScheme.Light}.get(scheme))
    scratch = Path(tempfile.mkdtemp(prefix="edgegen-shots-"))
    paths = AppPaths(scratch / "config", scratch / "data")
    save_settings(paths, Settings(output_folder=str(scratch / "out"), engines_folder=str(bundle.parent)))
    os.environ.setdefault("EDGEGEN_AUDIT_LOG", str(scratch / "audit.jsonl"))
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if scheme != "dark" else "-dark"
    written: list[Path] = []

    def settle(ms: int = 150) -> None:
        loop = QEventLoop()
        QTimer.singleShot(ms, loop.quit)
        loop.exec()

    def shot(name: str, ms: int = 150) -> None:
        settle(ms)
        path = out / f"{name}{suffix}.png"
        if not window.grab().save(str(path)):
            raise SystemExit(f"screenshots: could not write {path}")
        written.append(path)

    window = MainWindow(paths=paths, bundle=bundle)
    window.resize(width, height)
    window.show()
    wait = QEventLoop()
    window.queue.model_ready.connect(wait.quit)
    window.queue.model_failed.connect(lambda _b, message: (print(message, file=sys.stderr), wait.quit()))
    wait.exec()  # the status bar now names the backend
    shot("empty")

    form = window.form
    if size:
        form.set_size(size, size)
    if steps:
        form.steps.setValue(steps)
    form.random_seed.setChecked(False)
    remaining = list(PROMPTS)
    taken = {"generating": False}

    def progress(job, step, total, _eta) -> None:
        if not taken["generating"] and step >= max(1, total // 3):
            taken["generating"] = True
            shot("generating", ms=20)  # short: the job keeps running while the layout settles

    def saved(_entry_id: int) -> None:
        if remaining:
            QTimer.singleShot(0, queue_next)
        elif not window.queue.jobs():
            wait.quit()

    def queue_next() -> None:
        form.prompt.setPlainText(remaining.pop(0))
        form.seed.setText(str(7 + len(remaining)))
        window.generate()

    window.queue.progress.connect(progress)
    window.image_saved.connect(saved)
    window.queue.failed.connect(lambda _job, message: (print(message, file=sys.stderr), wait.quit()))
    # The last prompt drawn is the first one, so the result shot shows it; two are queued at once so the
    # generating shot shows the queue.
    remaining.reverse()
    queue_next()
    queue_next()
    wait.exec()
    shot("result")
    window.tabs.setCurrentWidget(window.gallery)
    shot("gallery")
    window.close()
    dispose(window)
    return written


def main(argv: list[str] | None = None) -> int:
    from app import offline

    offline.enforce_offline()
    p = argparse.ArgumentParser(prog="python -m tools.screenshots", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parents[2] / "engines" / "demo")
    p.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    p.add_argument("--window", default="1280x800", help="window size WxH in logical pixels")
    p.add_argument("--size", type=int, help="image size in px (default: the bundle's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the bundle's)")
    p.add_argument("--scheme", choices=("light", "dark", "system"), default="light")
    p.add_argument("--show", action="store_true", help="use the real display instead of offscreen")
    args = p.parse_args(argv)
    if not args.show:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    w, _, h = args.window.partition("x")
    for path in take(args.bundle, args.out, int(w), int(h), args.size, args.steps, args.scheme):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
