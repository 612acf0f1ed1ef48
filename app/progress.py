"""Terminal progress for long work (export, engine builds, generation), on stderr."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console

console = Console(stderr=True, highlight=False)


def say(message: str) -> None:
    console.print(message, markup=False, soft_wrap=True)


@contextmanager
def step_bar(label: str, total_images: int = 1):
    """Yields on_step(step, total) that renders '<label> step i/n, elapsed, eta' as a rich progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if not sys.stderr.isatty():
        start = time.monotonic()

        def plain(step: int, total: int) -> None:
            if step == total:
                say(f"{label}: {total} steps in {time.monotonic() - start:.1f}s")

        yield plain
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(step: int, total: int) -> None:
            bar.update(task, completed=step, total=total)

        yield update
