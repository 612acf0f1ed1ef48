"""Print the self-test's outcome: PASS/FAIL per backend with PSNR, then what this machine did not cover and why."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def render(outcomes, skipped: list[tuple[str, str]], bundle, n_refs: int, console: Console | None = None) -> None:
    c = console or Console(highlight=False)
    c.print(f"[bold]edgegen selftest[/] — {n_refs} reference image(s), bundle {escape(str(bundle.root))} "
            f"({bundle.precision})")
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for col in ("backend", "result", "worst PSNR", "needs", "time", "ms/step", "VRAM torch/NVML"):
        t.add_column(col, no_wrap=col == "backend", overflow="fold")
    for o in outcomes:
        db = "—" if o.worst_db is None else ("identical" if o.worst_db == float("inf") else f"{o.worst_db:.1f} dB")
        t.add_row(o.label, "[green]PASS[/]" if o.passed else "[red]FAIL[/]", db,
                  getattr(o, "needs", "") or f"≥ {o.threshold_db:.0f} dB",
                  f"{o.seconds:.1f}s", *cost_cells(o.cost))
    c.print(t)
    for o in outcomes:
        if o.detail:
            c.print(f"  {o.label}: {o.detail}", markup=False, soft_wrap=True)
    if skipped:
        c.print("\n[bold]Not covered on this machine[/]")
        for label, why in skipped:
            c.print(f"  {label}: {why}", markup=False, soft_wrap=True)
    if not outcomes:
        c.print("[red bold]FAIL[/]: no backend could run")
    elif all(o.passed for o in outcomes):
        c.print(f"[green bold]PASS[/]: {len(outcomes)} backend(s) reproduced the references")
    else:
        bad = [o.label for o in outcomes if not o.passed]
        c.print(f"[red bold]FAIL[/]: {', '.join(bad)}")


def cost_cells(cost) -> tuple[str, str]:
    """(ms per step, peak VRAM) as table cells; dashes where not measured (the CPU has no VRAM)."""
    if cost is None:
        return "—", "—"
    ms = "—" if cost.ms_per_step is None else f"{cost.ms_per_step:.1f}"
    gib = lambda n: "—" if n is None else f"{n / 1024**3:.2f} GiB"  # noqa: E731
    vram = "—" if cost.peak_torch_bytes is None else f"{gib(cost.peak_torch_bytes)} / {gib(cost.peak_nvml_bytes)}"
    return ms, vram
