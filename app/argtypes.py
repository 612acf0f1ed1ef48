"""Command-line value types shared by every subcommand: a bad value is one line naming it, never a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def whole(lo: int | None = None, hi: int | None = None, what: str = "whole number",
          why: str = "") -> Callable[[str], int]:
    """An argparse type: an int within [lo, hi] (either bound optional), e.g. whole(1, what="number of pixels")."""

    def parse(value: str) -> int:
        try:
            v = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{value}' is not a {what}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"{v} must be {bounds}{why}")
        return v

    return parse
