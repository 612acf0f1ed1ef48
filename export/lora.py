"""Brand LoRAs fused into the transformer before export (and before FP8 calibration), via diffusers."""

from __future__ import annotations

from pathlib import Path

import torch

from app.bundle.files import sha256_file
from app.errors import UsageError


def _read(path: Path, pipeline_class: str) -> dict:
    import diffusers

    if path.suffix != ".safetensors" or not path.is_file():
        raise UsageError(f"--lora {path} must be an existing .safetensors file (pickle LoRAs are refused)")
    try:
        state = getattr(diffusers, pipeline_class).lora_state_dict(str(path))
    except Exception as e:  # diffusers raises many types for a malformed file
        raise UsageError(f"--lora {path} is not a LoRA diffusers can read ({str(e).splitlines()[0][:120]})") from None
    return state[0] if isinstance(state, tuple) else state


def check_loras(transformer_dir: Path, pipeline_class: str, loras) -> None:
    """Refuse a LoRA whose layers the transformer does not have, before any minutes of export are spent.

    Reads only the safetensors headers of the transformer, not its weights."""
    from app.planning.components import safetensors_names

    weights = safetensors_names(transformer_dir)
    for path, _scale in loras:
        state = _read(Path(path), pipeline_class)
        targets = {k.removeprefix("transformer.").split(".lora_")[0] for k in state if ".lora_" in k}
        missing = sorted(t for t in targets if f"{t}.weight" not in weights)
        if not targets or missing:
            example = f" (e.g. {missing[0]})" if missing else ""
            raise UsageError(f"--lora {path} targets layers this model's transformer does not have{example}; "
                             "use a LoRA trained for this model")


def fuse_loras(transformer: torch.nn.Module, pipeline_class: str, loras) -> list[dict]:
    """Load each LoRA with the pipeline's own LoRA loader, fuse it at its scale, drop the adapter layers.

    Fused weights are ordinary weights, so the ONNX, FP8 calibration and engines all see the brand style;
    the manifest records which file (sha256) at which scale."""
    records = []
    for i, (path, scale) in enumerate(loras):
        path = Path(path)
        state = _read(path, pipeline_class)
        name = f"edgegen_lora_{i}"
        before = {n for n, _ in transformer.named_modules()}
        try:
            transformer.load_lora_adapter(state, prefix="transformer", adapter_name=name)
        except Exception as e:
            raise UsageError(f"--lora {path} does not fit this model's transformer ({str(e).splitlines()[0][:120]}); "
                             "use a LoRA trained for this model") from None
        if name not in getattr(transformer, "peft_config", {}) or {n for n, _ in transformer.named_modules()} == before:
            raise UsageError(f"--lora {path} matches no layer of this model's transformer; "
                             "use a LoRA trained for this model family")
        transformer.fuse_lora(lora_scale=scale, adapter_names=[name])
        transformer.unload_lora()
        records.append({"file": path.name, "sha256": sha256_file(path), "scale": scale,
                        "tensors": len(state)})
    return records
