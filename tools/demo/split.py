"""Which shape prompts train the demo model and which are held out to measure it: disjoint seeds and combinations."""

from __future__ import annotations

from tools.demo import shapes

HELD_OUT_SEED0 = 1_000_000  # generator seeds from here on are never used for training


def held_out(n: int = 48) -> list[tuple[str, int]]:
    """(prompt, seed) pairs whose prompts come from generator seeds never used for training."""
    return [(shapes.sample(HELD_OUT_SEED0 + i, positionless=False)[1], 1000 + i) for i in range(n)]


def held_out_combos(n: int = 48) -> set[tuple[str, str, str, str]]:
    """The (shape colour, background, shape, position) combinations of held_out(): training leaves them out."""
    out = set()
    for i in range(n):
        a = shapes.sample(HELD_OUT_SEED0 + i, positionless=False)[2]
        out.add((a["shape_color"], a["background"], a["shape"], a["position"]))
    return out


def caption_pool(n: int) -> list[tuple[int, str, dict]]:
    """n distinct training captions (seed, caption, attributes), none showing a held-out combination."""
    held = held_out_combos()
    pool, seen, seed = [], set(), 0
    while len(pool) < n:
        _, cap, a = shapes.sample(seed)
        key = (a["shape_color"], a["background"], a["shape"], a["position"])
        if cap not in seen and key not in held:
            pool.append((seed, cap, a))
            seen.add(cap)
        seed += 1
        assert seed < HELD_OUT_SEED0
    return pool
