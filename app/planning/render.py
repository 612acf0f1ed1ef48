"""A plan as a rich table for the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.planning.plan import Plan
from app.planning.policy import GIB

if TYPE_CHECKING:
    from rich.table import Table

def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.1f} GiB"


def render_plan(plan: Plan) -> Table:
    """A rich table of the plan; its caption carries the strategy and notes."""
    from rich.table import Table

    g = plan.gpu
    head = f"{g.name} (sm{g.sm}, {_gib(g.vram_bytes)})" if g else "CPU (no NVIDIA GPU)"
    title = (
        f"Plan for {head}: {plan.width}x{plan.height}, batch {plan.batch}, CFG {'on' if plan.cfg else 'off'}"
    )
    t = Table(
        title=title,
        caption=" ".join(
            [
                f"Strategy: {plan.strategy}, peak {_gib(plan.peak_bytes)} "
                f"of {_gib(plan.usable_bytes)} usable.",
                *plan.notes,
            ]
        ),
    )
    for col in (
        "Component",
        "Kind",
        "Precision",
        "Engine",
        "Batch",
        "Weights",
        "Activations",
        "Peak",
        "Stage",
    ):
        t.add_column(
            col, justify="right" if col in ("Batch", "Weights", "Activations", "Peak", "Stage") else "left"
        )
    for c in plan.components:
        t.add_row(
            c.name,
            c.kind,
            c.precision,
            c.engine + (" (streaming)" if c.weight_streaming else ""),
            str(c.profile["batch"][1]),
            _gib(c.weights_bytes),
            _gib(c.activation_bytes),
            _gib(c.peak_bytes),
            str(c.stage),
        )
    return t

