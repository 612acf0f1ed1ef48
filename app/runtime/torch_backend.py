"""The PyTorch reference backend: the source folder's diffusers modules in the same wrappers export traces."""

from __future__ import annotations

from pathlib import Path

import torch

from app.bundle.manifest import Bundle
from app.errors import BundleError


class TorchBackend:
    """The PyTorch reference: the diffusers modules from the bundle's source folder, in the export wrappers."""

    name = "torch"

    def __init__(self, bundle: Bundle, model: Path | None = None, device: torch.device | None = None):
        from app.bundle.files import sha256_file
        from app.bundle.modelfolder import inspect_folder

        self.bundle = bundle
        self.device = device or torch.device("cpu")
        src = Path(model or bundle.manifest["source"]["path"])
        if not (src / "model_index.json").is_file():
            raise BundleError(f"the PyTorch reference needs the source model folder {src}, which is not here; "
                              "pass --model DIR or use --backend onnxruntime")
        if sha256_file(src / "model_index.json") != bundle.manifest["source"]["model_index_sha256"]:
            raise BundleError(f"{src} is not the model this bundle was exported from; pass the right --model")
        self.folder = inspect_folder(src, bundle.manifest["family"])
        self._modules: dict[str, torch.nn.Module] = {}

    def module(self, component: str) -> torch.nn.Module:
        if component not in self._modules:
            from app.models.loading import load_component
            from app.models.wrappers import wrap

            spec = self.spec(component)
            module = wrap(spec, load_component(self.folder, spec.source), self.slots(component))
            self._modules[component] = module.to(self.device)
        return self._modules[component]

    def spec(self, component: str):
        """The component's inputs as the bundle has them (with a run-time LoRA bundle's side-branch inputs)."""
        from app.bundle.families import component_spec

        return component_spec(self.folder.family, self.bundle.manifest, component)

    def slots(self, component: str) -> list[dict] | None:
        """A run-time LoRA bundle's side-branch layers for this component (None: no LoRA inputs)."""
        return (self.bundle.components()[component].get("lora") or {}).get("slots")

    def run(self, component, inputs):
        spec = self.spec(component)
        with torch.no_grad():
            out = self.module(component)(*[inputs[t.name] for t in spec.inputs])
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o for t, o in zip(spec.outputs, out)}

    def release(self, component: str) -> None:
        if self._modules.pop(component, None) is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> str:
        where = "" if self.device.type == "cpu" else f" on {self.device}"
        return f"PyTorch reference (diffusers modules, FP32){where}"

