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

