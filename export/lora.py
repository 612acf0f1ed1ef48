"""Brand LoRAs fused into the transformer before export (and before FP8 calibration), via diffusers: the fusing
itself is app/runtime/loras.fuse_loras, which the PyTorch reference backend uses too."""

from __future__ import annotations

from pathlib import Path

from app.errors import UsageError
from app.runtime.loras import fuse_loras, read_fused_lora

__all__ = ["check_loras", "fuse_loras"]


def check_loras(transformer_dir: Path, pipeline_class: str, loras) -> None:
    """Refuse a LoRA whose layers the transformer does not have, before any minutes of export are spent.

    Reads only the safetensors headers of the transformer, not its weights."""
    from app.planning.components import safetensors_names

    weights = safetensors_names(transformer_dir)
    for path, _scale in loras:
        state = read_fused_lora(Path(path), pipeline_class)
        targets = {k.removeprefix("transformer.").split(".lora_")[0] for k in state if ".lora_" in k}
        missing = sorted(t for t in targets if f"{t}.weight" not in weights)
        if not targets or missing:
            example = f" (e.g. {missing[0]})" if missing else ""
            raise UsageError(f"--lora {path} targets layers this model's transformer does not have{example}; "
                             "use a LoRA trained for this model")


