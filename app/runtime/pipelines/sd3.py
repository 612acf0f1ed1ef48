"""Stable Diffusion 3.5: CLIP-L + CLIP-G + T5 prompt embeddings, batched CFG, shifted flow-matching schedule."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from app.runtime.pipelines.base import GenerationRequest, Job, Pipeline

DEFAULT_STRENGTH = 0.6  # StableDiffusion3Img2ImgPipeline's default


class SD3Pipeline(Pipeline):
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def _input(self, component: str, name: str) -> dict:
        return next(i for i in self.bundle.components()[component]["inputs"] if i["name"] == name)

    def _clip_tokens(self, tokenizer: str, prompt: str) -> torch.Tensor:
        tok = self.tokenizer(tokenizer)
        limit = tok.model_max_length
        self.warn_truncation(tok, prompt, limit, "the prompt (CLIP)")
        return tok(prompt, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids

    def _t5_tokens(self, prompt: str) -> torch.Tensor | None:
        if "text_encoder_3" not in self.bundle.components():
            return None
        tok = self.tokenizer("tokenizer_3")
        length = self.text_length("text_encoder_3")
        self.warn_truncation(tok, prompt, length, "the prompt (T5)")
        return tok(prompt, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                   return_tensors="pt").input_ids

    def _prompt_tokens(self, prompt: str) -> dict:
        return {"clip_l": self._clip_tokens("tokenizer", prompt), "clip_g": self._clip_tokens("tokenizer_2", prompt),
                "t5": self._t5_tokens(prompt)}

    def tokenize(self, req: GenerationRequest) -> dict:
        # CFG: [negative, positive] in one batch, as diffusers does
        cfg = req.guidance > 1.0
        return {"pos": self._prompt_tokens(req.prompt),
                "neg": self._prompt_tokens(req.negative_prompt) if cfg and not req.zero_negative else None,
                "zero_negative": cfg and req.zero_negative}

    def _clip(self, name: str, ids: torch.Tensor):
        out = self.backend.run(name, {"input_ids": self.to_device(ids)})
        return out["hidden"].to(torch.float32, copy=True), out["pooled"].to(torch.float32, copy=True)

    def _t5(self, ids: torch.Tensor | None) -> torch.Tensor:
        if ids is None:  # SD3 folders may ship without T5: the pipeline uses zeros
            dim = self._input("transformer", "encoder_hidden_states")["shape"][-1]
            return torch.zeros(1, self.text_length("text_encoder_3"), dim, device=self.device)
        return self.run_encoder("text_encoder_3", {"input_ids": ids}, "hidden")

    def _embed(self, tokens: dict):
        h1, p1 = self._clip("text_encoder", tokens["clip_l"])
        h2, p2 = self._clip("text_encoder_2", tokens["clip_g"])
        t5 = self._t5(tokens["t5"])
        clip = torch.cat([h1, h2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([p1, p2], dim=-1)

    def encode_tokens(self, tokens: dict, req: GenerationRequest):
        embeds, pooled = self._embed(tokens["pos"])
        if tokens.get("zero_negative"):  # ConditioningZeroOut: CFG against zeros
            return torch.cat([torch.zeros_like(embeds), embeds]), torch.cat([torch.zeros_like(pooled), pooled])
        if tokens["neg"] is not None:
            neg, neg_pooled = self._embed(tokens["neg"])
            return torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
        return embeds, pooled

    def initial_noise(self, req: GenerationRequest):
        channels = self._input("transformer", "hidden_states")["shape"][1]
        scale = self.bundle.manifest["pipeline"]["vae_scale_factor"]
        shape = (1, channels, req.height // scale, req.width // scale)
        if not req.images:
            return self.noise(shape, req.seed), {}
        # Image-to-image draws twice from the one generator, in diffusers' order: the VAE posterior's sample
        # (latent_dist.sample(generator)) first, then the noise scale_noise mixes in.
        g = torch.Generator("cpu").manual_seed(req.seed)
        posterior = torch.randn(shape, generator=g, dtype=torch.float32)
        return torch.randn(shape, generator=g, dtype=torch.float32), {"posterior_noise": posterior}

    def schedule(self, req, state):
        kwargs = {}
        c = self._scheduler.config
        if c.get("use_dynamic_shifting", None):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            cell = self.bundle.manifest["pipeline"]["vae_scale_factor"] * self.bundle.manifest["pipeline"]["patch"]
            seq = (req.height // cell) * (req.width // cell)
            kwargs["mu"] = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        timesteps, sigmas = self.host_schedule(req.steps, **kwargs)
        if req.images:  # StableDiffusion3Img2ImgPipeline.get_timesteps: strength cuts the start of the schedule
            init = min(req.steps * req.strength, req.steps)
            start = int(max(req.steps - init, 0)) * self._scheduler.order
            timesteps, sigmas = timesteps[start:], sigmas[start:]
        return timesteps, sigmas

    # ----- image-to-image: StableDiffusion3Img2ImgPipeline ------------------------------------------------------
    def resolve(self, req, size=None):
        req = super().resolve(req, size)
        return replace(req, strength=DEFAULT_STRENGTH) if req.images and req.strength is None else req

    def image_size(self, req, inputs):
        """The init image's size, scaled down into the bundle's range and cut to its multiple (diffusers would
        default to 1024 x 1024 and stretch the image; pass --width/--height for that)."""
        w, h = inputs[0].size
        r = self.bundle.manifest["size_range"]
        s = min(1.0, r["max"] / w, r["max"] / h)
        return tuple(max(r["min"], (int(v * s) // r["multiple"]) * r["multiple"]) for v in (w, h))

    def prepare_images(self, job: Job, inputs: list) -> None:
        from diffusers.image_processor import VaeImageProcessor

        p = self.bundle.manifest["pipeline"]
        processor = VaeImageProcessor(vae_scale_factor=p["vae_scale_factor"], vae_latent_channels=p["latent_channels"])
        job.images.append(processor.preprocess(inputs[0].image, height=job.req.height, width=job.req.width).float())

    def encode_images(self, job: Job, state: dict) -> dict:
        if "controls" in job.state:
            return {**state, "controls": self.encode_controls(job.state["controls"])}
        init = self.run_vae_encoder({"image": job.images[0], "noise": job.state["posterior_noise"]})
        return {**state, "init_latents": init}

    # ----- ControlNet: StableDiffusion3ControlNetPipeline ------------------------------------------------------
    def prepare_controls(self, job: Job, controls: list, inputs: list) -> None:
        """Each control image at the output size, preprocessed, as the VAE encoder's NCHW [-1, 1] input, with
        the posterior noise diffusers' latent_dist.sample() draws for it: one draw of CFG's doubled batch per
        control, in order, from torch's global RNG, which a caller of diffusers seeds with torch.manual_seed
        (here: a generator seeded with the request's seed, the same numbers)."""
        from diffusers.image_processor import VaeImageProcessor

        from app.runtime.controls import control_picture, control_records

        p = self.bundle.manifest["pipeline"]
        nets = self.bundle.manifest["controlnets"]
        processor = VaeImageProcessor(vae_scale_factor=p["vae_scale_factor"], vae_latent_channels=p["latent_channels"])
        req = job.req
        batch = 2 if req.guidance > 1.0 else 1
        scale = p["vae_scale_factor"]
        g = torch.Generator("cpu").manual_seed(req.seed)
        prepared = []
        for c, i in zip(controls, inputs):
            picture = control_picture(i.image, req.width, req.height, nets[c.name]["preprocessor"], c.preprocess)
            image = processor.preprocess(picture, height=req.height, width=req.width).float()
            noise = torch.randn((batch, p["latent_channels"], req.height // scale, req.width // scale), generator=g,
                                dtype=torch.float32)
            prepared.append({"name": c.name, "image": image, "noise": noise, "scale": c.scale, "start": c.start,
                             "end": c.end})
        job.state["controls"] = prepared
        job.controls = control_records(controls, inputs)

    def encode_controls(self, controls: list[dict]) -> list[dict]:
        """The control latents on the device: the VAE encoder once per CFG half (its profiles are batch 1; each
        half has its own posterior noise), shifted as the net's force_zeros_for_pooled_projection says."""
        p = self.bundle.manifest["pipeline"]
        out = []
        for c in controls:
            net = self.bundle.manifest["controlnets"][c["name"]]
            halves = [self.run_vae_encoder({"image": c["image"], "noise": n.unsqueeze(0)}) for n in c["noise"]]
            latents = torch.cat(halves) if len(halves) > 1 else halves[0]
            if net["force_zeros_for_pooled_projection"]:  # the encoder subtracted the VAE's shift; these nets skip it
                latents = latents + p["vae_shift_factor"] * p["vae_scaling_factor"]
            out.append({**c, "latents": latents, "net": net})
        return out

    def control_residuals(self, x, timestep, embeds, pooled, state) -> torch.Tensor | None:
        """The residual stack the transformer adds, summed over the request's nets at this step's scales (the
        nets outside their start/end window are not run: their scale is 0); zeros when none applies."""
        from app.bundle.families import CONTROLNET_RESIDUALS
        from app.runtime.controls import keep

        nets = self.bundle.manifest.get("controlnets")
        if not nets:
            return None
        i, n = state["step"]
        total = None
        for c in state.get("controls", ()):
            scale = c["scale"] * keep(i, n, c["start"], c["end"])
            if scale == 0.0:
                continue
            net = c["net"]
            feeds = {"hidden_states": x, "controlnet_cond": c["latents"], "timestep": timestep,
                     "pooled_projections": torch.zeros_like(pooled) if net["force_zeros_for_pooled_projection"]
                     else pooled}
            if net["uses_text"]:
                feeds["encoder_hidden_states"] = embeds
            out = self.backend.run(net["component"], feeds)["block_samples"].float() * scale
            total = out if total is None else total + out
        if total is None:
            key = (x.shape[0], x.shape[2], x.shape[3])
            if state.get("zero_residuals", (None,))[0] != key:
                shape = self._input("transformer", CONTROLNET_RESIDUALS)["shape"]
                patch = self.bundle.manifest["pipeline"]["patch"]
                tokens = (x.shape[2] // patch) * (x.shape[3] // patch)
                state["zero_residuals"] = (key, torch.zeros((shape[0], x.shape[0], tokens, shape[3]),
                                                            dtype=torch.float32, device=self.device))
            total = state["zero_residuals"][1]
        return total

    def initial_latents(self, job: Job, state: dict) -> torch.Tensor:
        noise = self.to_device(job.noise)
        if "init_latents" not in state:
            return noise
        # FlowMatchEulerDiscreteScheduler.scale_noise at the first kept step, in float32 as diffusers computes it
        sigma = np.float32(job.sigmas[0])
        return float(sigma) * noise + float(np.float32(1.0) - sigma) * state["init_latents"]

    def predict(self, latents, t, req, cond, state):
        from app.bundle.families import CONTROLNET_RESIDUALS

        embeds, pooled = cond
        cfg = embeds.shape[0] == 2
        x = torch.cat([latents] * 2) if cfg else latents
        timestep = torch.full((x.shape[0],), t, dtype=torch.float32, device=self.device)
        residuals = self.control_residuals(x, timestep, embeds, pooled, state)
        pred = self.backend.run("transformer", {
            "hidden_states": x, "encoder_hidden_states": embeds, "pooled_projections": pooled, "timestep": timestep,
            **({CONTROLNET_RESIDUALS: residuals} if residuals is not None else {}), **state["lora"],
        })["noise_pred"].float()
        if cfg:
            uncond, text = pred.chunk(2)
            pred = uncond + req.guidance * (text - uncond)
        return pred

    def decode(self, latents, req, state):
        return self.backend.run("vae_decoder", {"latents": latents})["image"].float()

    def latent_grid(self, latents, state):
        return latents.squeeze(0)

    def encode_pixels(self, image, noise, state):
        return self.run_vae_encoder({"image": image, "noise": torch.zeros_like(self.to_device(noise))})  # the mean
