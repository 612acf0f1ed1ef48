"""Loading one diffusers/transformers module from a checked model folder: safetensors only, no hub."""

from __future__ import annotations

import importlib

from app.bundle.modelfolder import ModelFolder
from app.errors import ModelFolderError


def load_component(folder: ModelFolder, source: str, dtype=None):
    """Load one module from its subfolder with the class model_index.json names; safetensors only, no hub."""
    import torch

    library, cls_name = folder.index[source]
    try:
        cls = getattr(importlib.import_module(library), cls_name)
    except (ImportError, AttributeError):
        raise ModelFolderError(f"{source} needs {library}.{cls_name}, which is not installed") from None
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()  # our own progress lines say what is loading
    transformers.utils.logging.disable_progress_bar()
    kwargs = {"use_safetensors": True, "local_files_only": True}
    if library == "transformers":
        kwargs["dtype"] = dtype or torch.float32
    else:
        kwargs["torch_dtype"] = dtype or torch.float32
    try:
        module = cls.from_pretrained(folder.path / source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelFolderError(f"cannot load {source} from {folder.path / source}: {str(e).splitlines()[0]}") from None
    return module.eval()



def load_controlnet(path, model: ModelFolder, shares_pos_embed: bool, dtype=None):
    """An SD3ControlNetModel folder; SD3.5 Large's nets (use_pos_embed false) get the transformer's position
    embedding, as StableDiffusion3ControlNetPipeline lends it, read tensor by tensor from the transformer's
    safetensors (not the whole transformer)."""
    from pathlib import Path

    import torch
    from diffusers import SD3ControlNetModel

    path = Path(path)
    try:
        net = SD3ControlNetModel.from_pretrained(path, use_safetensors=True, local_files_only=True,
                                                 torch_dtype=dtype or torch.float32)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelFolderError(f"cannot load the ControlNet {path}: {str(e).splitlines()[0]}") from None
    if shares_pos_embed:
        from diffusers.models.embeddings import PatchEmbed

        cfg = model.path / "transformer"
        import json

        c = json.loads((cfg / "config.json").read_text())
        pe = PatchEmbed(height=c.get("sample_size", 128), width=c.get("sample_size", 128),
                        patch_size=c.get("patch_size", 2), in_channels=c.get("in_channels", 16),
                        embed_dim=c["num_attention_heads"] * c["attention_head_dim"],
                        pos_embed_max_size=c.get("pos_embed_max_size", 96))
        pe.load_state_dict(_tensors(cfg, "pos_embed."), strict=True)
        net.pos_embed = pe.to(dtype or torch.float32)
    return net.eval()


def _tensors(folder, prefix: str) -> dict:
    """The tensors under `prefix` (prefix stripped) of a diffusers module folder's safetensors, sharded or not."""
    import json

    from safetensors import safe_open

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted({f for k, f in json.loads(index.read_text())["weight_map"].items() if k.startswith(prefix)})
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            out.update({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    return out
