"""TensorRT optimisation profiles for a bundle component, from the size range, defaults and CFG batching."""

from __future__ import annotations

from app.bundle.families import CONTROLNET_PREFIX, FamilySpec


def cfg_batched(family: FamilySpec, component: str, pipeline: dict) -> bool:
    """Whether the component sees CFG's doubled batch: the family's list, and the ControlNets beside the
    transformer; a distilled Klein never runs CFG."""
    listed = component in family.cfg_batched or component.startswith(CONTROLNET_PREFIX)
    return listed and not pipeline.get("is_distilled", False)


def dim_ranges(family: FamilySpec, component: str, size_range: dict, defaults: dict, pipeline: dict) -> dict:
    """(min, opt, max) for every dynamic dim name the component's inputs use."""
    scale = pipeline["vae_scale_factor"]
    lo, hi = size_range["min"], size_range["max"]
    opt_w, opt_h = defaults["width"], defaults["height"]
    # CFG runs [positive, negative] as one batch; a distilled Klein never runs CFG, so stays at batch 1.
    batch_max = 2 if cfg_batched(family, component, pipeline) else 1
    # Prompt lengths as the bundle records them from the model's configs (the demo model pads to 64).
    text = (pipeline.get("text_lengths") or family.text_lengths).get(component, 77)
    grid = {  # the grid the transformer / decoder see
        "latent_height": (lo // scale, opt_h // scale, hi // scale),
        "latent_width": (lo // scale, opt_w // scale, hi // scale),
    }
    cell = scale * family.patch
    tokens = lambda a, b: (a // cell) * (b // cell)  # noqa: E731
    if family.name == "flux2-klein":  # Klein's transformer/decoder work on packed tokens
        grid = {k: (a // family.patch, b // family.patch, c // family.patch) for k, (a, b, c) in grid.items()}
    img_seq = (tokens(lo, lo), tokens(opt_w, opt_h), tokens(hi, hi))
    refs = pipeline.get("max_images", 0) if family.name == "flux2-klein" else 0
    if refs:  # reference tokens follow the noisy tokens: each at most the bundle's largest side and 1 MP
        per_ref = min(tokens(hi, hi), pipeline.get("reference_max_pixels", 1 << 20) // (cell * cell))
        img_seq = (img_seq[0], img_seq[1], img_seq[2] + refs * per_ref)
    # the VAE encoder's image: Klein references may be any size from one token up to the largest side;
    # SD3's init image is resized to the output size
    smallest = cell if family.name == "flux2-klein" else lo
    pixels = (smallest, opt_h, hi), (smallest, opt_w, hi)
    return {
        "batch": (1, batch_max, batch_max),
        "text_seq": (text, text, text),
        "img_seq": img_seq,
        "height": pixels[0],
        "width": pixels[1],
        **grid,
    }


def profiles_for(family: FamilySpec, component: str, entry: dict, size_range: dict, defaults: dict,
                 pipeline: dict) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """One profile: every input's (min, opt, max) shape, with fixed dims as recorded in the manifest."""
    ranges = dim_ranges(family, component, size_range, defaults, pipeline)
    if entry.get("lora"):  # run-time LoRA: no LoRA is rank 1 of zeros; requests combine up to max_rank
        top = int(entry["lora"]["max_rank"])
        ranges["lora_rank"] = (1, min(top, 16), top)
    profile = {}
    for inp in entry["inputs"]:
        shapes = ([], [], [])
        for d in inp["shape"]:
            r = ranges[d] if isinstance(d, str) else (d, d, d)
            for i in range(3):
                shapes[i].append(int(r[i]))
        profile[inp["name"]] = tuple(tuple(s) for s in shapes)
    return [profile]


def profile_desc(family: FamilySpec, component: str, size_range: dict, pipeline: dict | None = None) -> str:
    """The profile part of an engine's key: batch, size range and, for the transformer, the reference limit."""
    pipeline = pipeline or {}
    b = 2 if cfg_batched(family, component, pipeline) else 1
    refs = pipeline.get("max_images", 0) if component == "transformer" else 0
    return f"b{b}-{size_range['min']}to{size_range['max']}" + (f"-r{refs}" if refs else "")
