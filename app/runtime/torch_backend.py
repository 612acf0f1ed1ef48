"""The PyTorch reference backend: the source folder's diffusers modules in the same wrappers export traces."""

from __future__ import annotations

from pathlib import Path

import torch

from app.bundle.manifest import Bundle
from app.errors import BundleError


class TorchBackend:
    """The PyTorch reference: the diffusers modules from the bundle's source folder, in the export wrappers."""

    name = "torch"

    def __init__(self, bundle: Bundle, model: Path | None = None, device: torch.device | None = None,
                 fused_loras: tuple = ()):
        """`fused_loras`: the (file, scale) pairs export fused into the bundle's transformer (--lora), fused the same
        way into the source transformer here; a bundle that records fused LoRAs is refused without them, as its
        reference would silently lack the brand style."""
        from app.bundle.files import sha256_file
        from app.bundle.modelfolder import inspect_folder

        self.bundle = bundle
        recorded = bundle.manifest.get("loras") or []
        if recorded and [r["sha256"] for r in recorded] != [sha256_file(Path(p)) for p, _ in fused_loras]:
            names = ", ".join(f"{r['file']} at {r['scale']}" for r in recorded)
            raise BundleError(f"this bundle has {names} fused in at export; the PyTorch reference cannot rebuild "
                              "it from the source folder alone: use --backend onnxruntime")
        self.fused_loras = tuple(fused_loras)
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
            from app.models.wrappers import wrap

            spec = self.spec(component)
            module = wrap(spec, self.load(spec), self.slots(component))
            self._modules[component] = module.to(self.device)
        return self._modules[component]

    def load(self, spec, dtype=None) -> torch.nn.Module:
        """The component's source module, with the export's fused LoRAs where it is the transformer."""
        from app.models.loading import load_component, load_controlnet

        if spec.role == "controlnet":  # export --controlnet's folder, as recorded (checked against its sha256)
            return load_controlnet(spec.source, self.folder, self.controlnet(spec)["shares_transformer_pos_embed"],
                                   dtype)
        module = load_component(self.folder, spec.source, dtype)
        if spec.role == "transformer" and self.fused_loras:
            from app.runtime.loras import fuse_loras

            fuse_loras(module, self.folder.index["_class_name"], self.fused_loras)
        return module

    def controlnet(self, spec) -> dict:
        """The manifest's record of a ControlNet component, its source folder checked against the export's hashes."""
        from app.bundle.files import sha256_file

        record = self.bundle.manifest["controlnets"][spec.name.removeprefix("controlnet_")]
        src = Path(record["source"]["path"])
        files = {"config.json": record["source"]["config_sha256"], **record["source"]["weights_sha256"]}
        if any(not (src / n).is_file() or sha256_file(src / n) != h for n, h in files.items()):
            raise BundleError(f"the PyTorch reference needs the ControlNet folder {src} this bundle was exported "
                              "from, unchanged; it is missing or differs: use --backend onnxruntime")
        return record

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

