"""The node schemas `/object_info` serves: the ComfyUI node types edgegen accepts, in ComfyUI's own shape.

Clients call `/object_info` before they submit anything (to fill dropdowns and validate graphs). The choices
are this server's: `ckpt_name` lists the installed bundles, `lora_name` the site LoRA library (docs/LORA.md).
Each entry has ComfyUI's keys (input.required/optional, input_order, output, output_is_list, output_name, name,
display_name, description, python_module, category, output_node); tests/test_server_nodes.py compares their
shape with a real ComfyUI's recorded answer (../shared/comfy-conformance). Inputs edgegen accepts and ignores
(KSampler's sampler_name and scheduler) are listed, as ComfyUI lists them.
"""

from __future__ import annotations

MAX_SEED = 2**63 - 1  # edgegen's seeds are torch generator seeds (ComfyUI allows 2**64 - 1)
MAX_SIZE = 16384


def _int(default, lo, hi, step=None, **extra):
    spec = {"default": default, "min": lo, "max": hi, **({"step": step} if step else {}), **extra}
    return ["INT", spec]


def _float(default, lo, hi, step, **extra):
    return ["FLOAT", {"default": default, "min": lo, "max": hi, "step": step, **extra}]


def _node(name, required, outputs=(), category="", description="", optional=None, output_node=False,
          display=None):
    inputs = {"required": required, **({"optional": optional} if optional else {})}
    tooltips = {"output_tooltips": [f"The {n.lower()}." for _, n in outputs]} if outputs else {}
    return {**tooltips,
        "input": inputs,
        "input_order": {k: list(v) for k, v in inputs.items()},
        "output": [t for t, _ in outputs],
        "output_is_list": [False] * len(outputs),
        "output_name": [n for _, n in outputs],
        "name": name,
        "display_name": display or name,
        "description": description,
        "python_module": "edgegen",
        "category": category,
        "output_node": output_node,
    }


def object_info(bundles: list[str], loras: list[str]) -> dict[str, dict]:
    """Every accepted node type's schema, with this server's bundles and LoRAs as the loaders' choices."""
    from app.bundle.loras import STRENGTH_RANGE
    from app.server.graph import MAX_COUNT

    lora_files = [f"{n}.safetensors" for n in loras]
    lo, hi = STRENGTH_RANGE
    latent = {"width": _int(1024, 16, MAX_SIZE, 16), "height": _int(1024, 16, MAX_SIZE, 16),
              "batch_size": _int(1, 1, MAX_COUNT)}
    nodes = [
        _node("CheckpointLoaderSimple", {"ckpt_name": [bundles, {"tooltip": "An edgegen bundle on this server."}]},
              [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], "loaders",
              "An edgegen engine bundle: its transformer, text encoders and VAE.", display="Load Checkpoint"),
        _node("CLIPTextEncode", {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
                                 "clip": ["CLIP"]},
              [("CONDITIONING", "CONDITIONING")], "conditioning", "The prompt, encoded by the bundle's text "
              "encoders.", display="CLIP Text Encode (Prompt)"),
        _node("EmptyLatentImage", latent, [("LATENT", "LATENT")], "latent", "The image size and batch.",
              display="Empty Latent Image"),
        _node("EmptySD3LatentImage", latent, [("LATENT", "LATENT")], "latent/sd3", "The image size and batch.",
              display="EmptySD3LatentImage"),
        _node("KSampler", {
            "model": ["MODEL"], "seed": _int(0, 0, MAX_SEED, control_after_generate=True),
            "steps": _int(20, 1, 10000), "cfg": _float(8.0, 0.0, 100.0, 0.1, round=0.01),
            "sampler_name": [["euler"], {"tooltip": "edgegen runs the bundle's flow-matching Euler sampler."}],
            "scheduler": [["simple"], {"tooltip": "edgegen uses the bundle's own scheduler."}],
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
            "denoise": _float(1.0, 1.0, 1.0, 0.01)},
              [("LATENT", "LATENT")], "sampling", "Denoises with the bundle's schedule, as edgegen generate.",
              display="KSampler"),
        _node("VAEDecode", {"samples": ["LATENT"], "vae": ["VAE"]}, [("IMAGE", "IMAGE")], "latent",
              "Latents to pixels with the bundle's VAE decoder.", display="VAE Decode"),
        _node("SaveImage", {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}, [],
              "image", "Saves PNGs with edgegen's metadata.", output_node=True, display="Save Image"),
        _node("LoraLoader", {
            "model": ["MODEL"], "clip": ["CLIP"], "lora_name": [lora_files],
            "strength_model": _float(1.0, lo, hi, 0.01), "strength_clip": _float(1.0, lo, hi, 0.01)},
              [("MODEL", "MODEL"), ("CLIP", "CLIP")], "loaders",
              "A LoRA from the site library, applied per request (bundles exported with --runtime-lora); "
              "strength_clip has no effect: library LoRAs are transformer-only.", display="Load LoRA"),
        _node("LoraLoaderModelOnly", {"model": ["MODEL"], "lora_name": [lora_files],
                                      "strength_model": _float(1.0, lo, hi, 0.01)},
              [("MODEL", "MODEL")], "loaders", "A LoRA from the site library, applied per request.",
              display="LoraLoaderModelOnly"),
        _node("EdgegenGenerate", {"bundle": [bundles], "prompt": ["STRING", {"multiline": True}]},
              [], "edgegen", "edgegen generate in one node.", output_node=True, display="edgegen Generate",
              optional={"negative_prompt": ["STRING", {"multiline": True}], "seed": _int(0, 0, MAX_SEED),
                        "steps": _int(4, 1, 10000), "guidance": _float(1.0, 0.0, 100.0, 0.1),
                        "width": _int(1024, 16, MAX_SIZE, 16), "height": _int(1024, 16, MAX_SIZE, 16),
                        "count": _int(1, 1, MAX_COUNT), "images": ["STRING", {"default": ""}],
                        "strength": _float(0.6, 0.01, 1.0, 0.01), "loras": ["STRING", {"default": ""}],
                        "filename_prefix": ["STRING", {"default": "edgegen"}]}),
    ]
    return {n["name"]: n for n in nodes}


# ComfyUI's model folders, as /models lists them; edgegen serves bundles as checkpoints and the LoRA library as
# loras; every other folder is empty here.
MODEL_FOLDERS = ("checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                 "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models",
                 "custom_nodes", "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders")
