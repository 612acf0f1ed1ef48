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
SAMPLERS = ("euler",)  # the bundles' flow-matching Euler step; other samplers are refused by name
# schedulers a KSampler may name: each runs the bundle's own flow-matching schedule (reported in history)
SCHEDULERS = ("simple", "sgm_uniform", "normal", "beta", "karras", "exponential", "ddim_uniform",
              "linear_quadratic", "kl_optimal")
CLIP_TYPES = ("flux2", "sd3")  # the families' text-encoder types; the loaded bundle's family must match
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")


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


def object_info(bundles: list[str], loras: list[str], images: list[str] = (), aliases: list[str] = (),
                controlnets: list[str] = ()) -> dict[str, dict]:
    """Every accepted node type's schema, with this server's bundles and LoRAs as the loaders' choices (and the
    input folder's images as LoadImage's; `aliases`: model file names a site mapped onto bundles or nets;
    `controlnets`: the bundles' ControlNet names)."""
    from app.bundle.loras import STRENGTH_RANGE
    from app.server.graph import MAX_COUNT

    lora_files = [f"{n}.safetensors" for n in loras]
    models = sorted({*bundles, *aliases})
    images = sorted(images)
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
            "sampler_name": [list(SAMPLERS), {"tooltip": "edgegen runs the bundle's flow-matching Euler sampler."}],
            "scheduler": [list(SCHEDULERS), {"tooltip": "edgegen uses the bundle's own schedule, as generate."}],
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
            "denoise": _float(1.0, 0.0, 1.0, 0.01)},
              [("LATENT", "LATENT")], "sampling", "Denoises with the bundle's schedule, as edgegen generate; "
              "denoise below 1 on a VAEEncode'd image is SD3.5 image-to-image (generate --strength).",
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
        # FLUX.2 Klein's native node set (ComfyUI's official templates) and the image nodes of its edit graphs
        _node("UNETLoader", {"unet_name": [models, {"tooltip": "An edgegen bundle (or a name aliased to one)."}],
                             "weight_dtype": [["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]]},
              [("MODEL", "MODEL")], "advanced/loaders", "The bundle's transformer engine; weight_dtype is the "
              "bundle's own precision.", display="Load Diffusion Model"),
        _node("CLIPLoader", {"clip_name": [models], "type": [list(CLIP_TYPES)]},
              [("CLIP", "CLIP")], "advanced/loaders", "The bundle's text encoder(s): the same bundle as the model.",
              optional={"device": [["default", "cpu"], {"advanced": True}]}, display="Load CLIP"),
        _node("VAELoader", {"vae_name": [models]}, [("VAE", "VAE")], "loaders",
              "The bundle's VAE: the same bundle as the model.", display="Load VAE"),
        _node("ConditioningZeroOut", {"conditioning": ["CONDITIONING"]}, [("CONDITIONING", "CONDITIONING")],
              "advanced/conditioning", "No negative prompt (used where cfg is 1).", display="ConditioningZeroOut"),
        _node("EmptyFlux2LatentImage", {"width": _int(1024, 16, MAX_SIZE, 16), "height": _int(1024, 16, MAX_SIZE, 16),
                                        "batch_size": _int(1, 1, MAX_COUNT)},
              [("LATENT", "LATENT")], "latent", "The image size and batch.", display="Empty Flux 2 Latent"),
        _node("Flux2Scheduler", {"steps": _int(20, 1, 4096), "width": _int(1024, 16, MAX_SIZE, 1),
                                 "height": _int(1024, 16, MAX_SIZE, 1)},
              [("SIGMAS", "SIGMAS")], "sampling/custom_sampling/schedulers",
              "The bundle's flow-matching schedule for this size (the same empirical shift).",
              display="Flux2Scheduler"),
        _node("RandomNoise", {"noise_seed": _int(0, 0, MAX_SEED, control_after_generate=True)},
              [("NOISE", "NOISE")], "sampling/custom_sampling/noise", "The seed, as generate --seed.",
              display="RandomNoise"),
        _node("KSamplerSelect", {"sampler_name": [list(SAMPLERS)]}, [("SAMPLER", "SAMPLER")],
              "sampling/custom_sampling/samplers", "Euler: the bundle's flow-matching sampler.",
              display="KSamplerSelect"),
        _node("CFGGuider", {"model": ["MODEL"], "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                            "cfg": _float(8.0, 0.0, 100.0, 0.1, round=0.01)},
              [("GUIDER", "GUIDER")], "sampling/custom_sampling/guiders", "cfg is generate --guidance.",
              display="CFGGuider"),
        _node("BasicGuider", {"model": ["MODEL"], "conditioning": ["CONDITIONING"]}, [("GUIDER", "GUIDER")],
              "sampling/custom_sampling/guiders", "No negative: guidance 1.", display="BasicGuider"),
        _node("SamplerCustomAdvanced", {"noise": ["NOISE"], "guider": ["GUIDER"], "sampler": ["SAMPLER"],
                                        "sigmas": ["SIGMAS"], "latent_image": ["LATENT"]},
              [("LATENT", "output"), ("LATENT", "denoised_output")], "sampling/custom_sampling",
              "Denoises as edgegen generate.", display="SamplerCustomAdvanced"),
        _node("LoadImage", {"image": [images, {"image_upload": True}]}, [("IMAGE", "IMAGE"), ("MASK", "MASK")],
              "image", "An image from the input folder (POST /upload/image).", display="Load Image"),
        _node("ImageScaleToTotalPixels", {
            "image": ["IMAGE"], "upscale_method": ["COMBO", {"multiselect": False, "options": list(UPSCALE_METHODS)}],
            "megapixels": _float(1.0, 0.01, 16.0, 0.01), "resolution_steps": _int(1, 1, 256, advanced=True)},
              [("IMAGE", "IMAGE")], "image/upscaling", "Scales to an area, as ComfyUI's node does.",
              display="Scale Image to Total Pixels"),
        _node("GetImageSize", {"image": ["IMAGE"]}, [("INT", "width"), ("INT", "height"), ("INT", "batch_size")],
              "image", "The image's width and height.", display="Get Image Size"),
        _node("VAEEncode", {"pixels": ["IMAGE"], "vae": ["VAE"]}, [("LATENT", "LATENT")], "latent",
              "A reference (FLUX.2 Klein) or init image (SD3.5), encoded by the bundle's VAE encoder.",
              display="VAE Encode"),
        _node("LoadImageMask", {"image": [images, {"image_upload": True}],
                                "channel": ["COMBO", {"multiselect": False, "options": ["alpha", "red", "green",
                                                                                        "blue"]}]},
              [("MASK", "MASK")], "mask", "A mask from an input-folder image's channel (alpha inverted, as "
              "ComfyUI's); 1 repaints.", display="Load Image (as Mask)"),
        _node("SetLatentNoiseMask", {"samples": ["LATENT"], "mask": ["MASK"]}, [("LATENT", "LATENT")],
              "latent/inpaint", "FLUX.2 Klein inpainting: the sampler repaints where the mask is 1, as "
              "edgegen generate --mask (diffusers' Flux2KleinInpaintPipeline; denoise is --strength).",
              display="Set Latent Noise Mask"),
        _node("ReferenceLatent", {"conditioning": ["CONDITIONING", {}]}, [("CONDITIONING", "CONDITIONING")],
              "advanced/conditioning/edit_models", "Adds a reference image (FLUX.2 Klein editing).",
              optional={"latent": ["LATENT", {}]}, display="ReferenceLatent"),
        # SD3.5 ControlNet (ComfyUI's sd3.5_large_canny / blur / depth templates)
        _node("ControlNetLoader", {"control_net_name": [sorted({*controlnets, *aliases}), {
            "tooltip": "A ControlNet of the model's bundle (export --controlnet NAME=DIR), or a name aliased to one."}]},
              [("CONTROL_NET", "CONTROL_NET")], "loaders", "One of the model bundle's ControlNets, by name.",
              display="Load ControlNet Model"),
        _node("ControlNetApplyAdvanced", {
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "control_net": ["CONTROL_NET"],
            "image": ["IMAGE"], "strength": _float(1.0, 0.0, 10.0, 0.01),
            "start_percent": _float(0.0, 0.0, 1.0, 0.001), "end_percent": _float(1.0, 0.0, 1.0, 0.001)},
              [("CONDITIONING", "positive"), ("CONDITIONING", "negative")], "conditioning/controlnet",
              "generate --control NET:IMAGE:STRENGTH:START:END (diffusers' StableDiffusion3ControlNetPipeline; the "
              "window is a fraction of the steps).", optional={"vae": ["VAE"]}, display="Apply ControlNet"),
        _node("ControlNetApplySD3", {
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "control_net": ["CONTROL_NET"],
            "vae": ["VAE"], "image": ["IMAGE"], "strength": _float(1.0, 0.0, 10.0, 0.01),
            "start_percent": _float(0.0, 0.0, 1.0, 0.001), "end_percent": _float(1.0, 0.0, 1.0, 0.001)},
              [("CONDITIONING", "positive"), ("CONDITIONING", "negative")], "conditioning/controlnet",
              "As ControlNetApplyAdvanced.", display="Apply Controlnet with VAE"),
        _node("Canny", {"image": ["IMAGE"], "low_threshold": _float(0.4, 0.01, 0.99, 0.01),
                        "high_threshold": _float(0.8, 0.01, 0.99, 0.01)},
              [("IMAGE", "IMAGE")], "image/preprocessors", "Edges with kornia.filters.canny, as ComfyUI's node.",
              display="Canny"),
        _node("ImageScale", {"image": ["IMAGE"], "upscale_method": [list(UPSCALE_METHODS)],
                             "width": _int(512, 0, MAX_SIZE, 1), "height": _int(512, 0, MAX_SIZE, 1),
                             "crop": [["disabled", "center"]]},
              [("IMAGE", "IMAGE")], "image/upscaling", "Scales (and centre-crops) as ComfyUI's common_upscale.",
              display="Upscale Image"),
        _node("PreviewImage", {"images": ["IMAGE"]}, [], "image", "Accepted and not drawn: edgegen returns the "
              "images SaveImage saves (a history message says so).", output_node=True, display="Preview Image"),
        _node("PrimitiveInt", {"value": _int(0, -MAX_SEED, MAX_SEED, control_after_generate=True)},
              [("INT", "INT")], "utils/primitive", "", display="Int"),
        _node("PrimitiveFloat", {"value": ["FLOAT", {"min": -1e9, "max": 1e9}]}, [("FLOAT", "FLOAT")],
              "utils/primitive", "", display="Float"),
        _node("PrimitiveString", {"value": ["STRING", {}]}, [("STRING", "STRING")], "utils/primitive", "",
              display="String"),
        _node("PrimitiveStringMultiline", {"value": ["STRING", {"multiline": True}]}, [("STRING", "STRING")],
              "utils/primitive", "", display="String (Multiline)"),
        _node("PrimitiveBoolean", {"value": ["BOOLEAN", {}]}, [("BOOLEAN", "BOOLEAN")], "utils/primitive", "",
              display="Boolean"),
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
