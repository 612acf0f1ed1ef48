"""FLUX.2 Klein: Qwen3 prompt embeddings, packed latents, empirical-mu flow-matching schedule.

Channel counts come from the bundle (the transformer's `hidden_states` width), never from constants.
"""

from __future__ import annotations

import numpy as np
import torch

from app.runtime.pipelines.base import GenerationRequest, Job, Pipeline



def text_ids(batch: int, length: int) -> torch.Tensor:
    """(0, 0, 0, l) per token, as Flux2KleinPipeline._prepare_text_ids builds them."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.unsqueeze(0).expand(batch, -1, -1)


def latent_ids(batch: int, h: int, w: int) -> torch.Tensor:
    """(0, y, x, 0) in raster order, as Flux2KleinPipeline._prepare_latent_ids builds them."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    return ids.unsqueeze(0).expand(batch, -1, -1)


def reference_ids(batch: int, grids: list[tuple[int, int]]) -> torch.Tensor:
    """(10 + 10 i, y, x, 0) for the i-th reference, as Flux2KleinPipeline._prepare_image_ids builds them."""
    ids = [torch.cartesian_prod(torch.tensor([10 + 10 * i]), torch.arange(h), torch.arange(w), torch.arange(1))
           for i, (h, w) in enumerate(grids)]
    return torch.cat(ids).unsqueeze(0).expand(batch, -1, -1)


class KleinPipeline(Pipeline):
    text_encoders = ("text_encoder",)

    @property
    def packed_channels(self) -> int:
        """Latent channels x 2x2 patch, as the transformer's `hidden_states` declares them in the manifest."""
        spec = next(i for i in self.bundle.components()["transformer"]["inputs"] if i["name"] == "hidden_states")
        return int(spec["shape"][-1])

    def _use_cfg(self, req: GenerationRequest) -> bool:
        return req.guidance > 1.0 and not self.bundle.manifest["pipeline"].get("is_distilled", False)

    def _tokens(self, prompt: str) -> dict[str, torch.Tensor]:
        tok = self.tokenizer("tokenizer")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
        length = self.text_length("text_encoder")
        self.warn_truncation(tok, text, length, "the prompt")
        enc = tok(text, return_tensors="pt", padding="max_length", truncation=True, max_length=length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def tokenize(self, req: GenerationRequest) -> dict:
        # Klein's base (non-distilled) pipeline uses an empty negative prompt for CFG; no user negative prompt.
        return {"pos": self._tokens(req.prompt), "neg": self._tokens("") if self._use_cfg(req) else None}

    def encode_tokens(self, tokens: dict, req: GenerationRequest):
        pos = self.run_encoder("text_encoder", tokens["pos"], "prompt_embeds")
        neg = self.run_encoder("text_encoder", tokens["neg"], "prompt_embeds") if tokens["neg"] is not None else None
        return pos, neg

    def _grid(self, req: GenerationRequest) -> tuple[int, int]:
        cell = self.bundle.manifest["pipeline"]["vae_scale_factor"] * 2  # pixels per packed token
        return req.height // cell, req.width // cell

    def initial_noise(self, req: GenerationRequest):
        h, w = self._grid(req)
        c = self.packed_channels
        noise = self.noise((1, c, h, w), req.seed)
        packed = noise.reshape(1, c, h * w).permute(0, 2, 1)
        return packed, {"h": h, "w": w}

    def schedule(self, req, state):
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        sigmas = np.linspace(1.0, 1 / req.steps, req.steps)
        if getattr(self._scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=state["h"] * state["w"], num_steps=req.steps)
        timesteps, sigmas = self.host_schedule(req.steps, sigmas=sigmas, mu=mu)
        if req.mask:  # Flux2KleinInpaintPipeline.get_timesteps: strength cuts the start (mu from the full count)
            start = int(max(req.steps - min(req.steps * req.strength, req.steps), 0))
            timesteps, sigmas = timesteps[start:], sigmas[start:]
        return timesteps, sigmas

    def resolve(self, req, size=None):
        from dataclasses import replace

        from app.runtime.references import INPAINT_STRENGTH

        req = super().resolve(req, size)
        return replace(req, strength=INPAINT_STRENGTH) if req.mask and req.strength is None else req

    # ----- references: Flux2KleinPipeline's image= path --------------------------------------------------------
    def image_size(self, req, inputs):
        from app.runtime.references import reference_size

        return reference_size(inputs[0].size, self.bundle.manifest["pipeline"],  # the first reference's size
                              self.bundle.manifest["size_range"]["max"])

    def prepare_images(self, job: Job, inputs: list) -> None:
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        from app.runtime.references import check_reference_size, reference_size

        pipeline = self.bundle.manifest["pipeline"]
        largest = self.bundle.manifest["size_range"]["max"]
        m = pipeline["vae_scale_factor"] * 2
        processor = Flux2ImageProcessor(vae_scale_factor=m)
        grids = []
        if job.mask is not None:  # inpainting: the first image is the one inpainted, stretched to the output size
            self.prepare_inpaint(job, inputs[0], processor)
            grids.append((job.req.height // m, job.req.width // m))
            inputs = inputs[1:]
        for ref, record in zip(inputs, job.references[len(grids):]):
            w, h = reference_size(ref.size, pipeline, largest)
            check_reference_size(ref, w, h, pipeline)
            img = self.scaled_picture(job, ref)
            if img is not ref.image:
                record["scaled_to"] = [w, h]
            job.images.append(processor.preprocess(img, height=h, width=w, resize_mode="crop").float())
            grids.append((h // m, w // m))
        job.state["ref_grids"] = grids

    def scaled_picture(self, job: Job, ref):
        """The input's picture resized (LANCZOS, as Flux2ImageProcessor._resize_to_target_area) where it is above
        1 MP or longer than the bundle encodes, with the status line saying so; else the picture itself."""
        from PIL import Image

        from app.runtime.references import scaled_size, scaling_note

        pipeline, largest = self.bundle.manifest["pipeline"], self.bundle.manifest["size_range"]["max"]
        to = scaled_size(ref.size, pipeline, largest)
        if to is None:
            return ref.image
        job.notes.append(scaling_note(ref.name, ref.size, pipeline, largest))
        return ref.image.resize(to, Image.Resampling.LANCZOS)

    def prepare_inpaint(self, job: Job, init, processor) -> None:
        """Flux2KleinInpaintPipeline's preprocessing: the image scaled as a reference (1 MP, or the bundle's side)
        then stretched (LANCZOS) to the output size; the mask resized from its own size (LANCZOS), grey, binarised
        at 0.5, then bilinear to the token grid and packed (1, h*w, 1): 1 repaints."""
        import torch.nn.functional as F
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        W, H = job.req.width, job.req.height
        img = self.scaled_picture(job, init)
        job.images.append(processor.preprocess(img, height=H, width=W, resize_mode="default").float())
        masks = Flux2ImageProcessor(vae_scale_factor=processor.config.vae_scale_factor, do_normalize=False,
                                    do_binarize=True, do_convert_rgb=False, do_convert_grayscale=True)
        mask = masks.preprocess(job.mask.image, height=H, width=W, resize_mode="default").float()
        h, w = job.state["h"], job.state["w"]
        grid = F.interpolate(mask, size=(h, w), mode="bilinear")
        job.state["mask"] = grid.reshape(1, 1, h * w).permute(0, 2, 1)

    def encode_images(self, job: Job, state: dict) -> dict:
        """Each reference through the VAE encoder on the device, packed and concatenated (N_ref tokens, C).
        Inpainting: the image inpainted is the first of them (its clean latents condition every step, as
        Flux2KleinInpaintPipeline feeds them) and the init latents the mask keeps."""
        packed = []
        for image in job.images:
            lat = self.run_vae_encoder({"image": image})  # (1, C, h, w), normalised, owned
            packed.append(lat.reshape(1, lat.shape[1], -1).permute(0, 2, 1))
        state = {**state, "ref_tokens": torch.cat(packed, dim=1)}
        if job.mask is not None:
            state["init_latents"] = packed[0]
        return state

    def initial_latents(self, job: Job, state: dict) -> torch.Tensor:
        noise = self.to_device(job.noise)
        if "init_latents" not in state:
            return noise
        state["noise"] = noise  # keep_unmasked noises the init latents with it after every step
        sigma = np.float32(job.sigmas[0])  # scale_noise at the first kept step
        return float(sigma) * noise + float(np.float32(1.0) - sigma) * state["init_latents"]

    def device_state(self, job: Job) -> dict:
        h, w = job.state["h"], job.state["w"]
        length = job.tokens["pos"]["input_ids"].shape[1]
        batch = 2 if job.tokens["neg"] is not None else 1  # CFG: [positive, negative] in one batch
        ids = latent_ids(batch, h, w)
        if job.state.get("ref_grids"):  # reference ids follow the noisy tokens' ids, as the tokens do
            ids = torch.cat([ids, reference_ids(batch, job.state["ref_grids"])], dim=1)
        state = {k: v for k, v in job.state.items() if k != "mask"}
        if "mask" in job.state:
            state["mask"] = self.to_device(job.state["mask"])
        return {**state, "batch": batch,
                "img_ids": self.to_device(ids),
                "txt_ids": self.to_device(text_ids(batch, length))}

    def predict(self, latents, t, req, cond, state):
        pos, neg = cond
        batch = state["batch"]
        refs = state.get("ref_tokens")
        x = latents if refs is None else torch.cat([latents, refs], dim=1)  # references at the same timestep
        x = x if batch == 1 else torch.cat([x, x])
        embeds = pos if neg is None else torch.cat([pos, neg])
        timestep = torch.full((batch,), t, dtype=torch.float32, device=self.device) / 1000
        out = self.backend.run("transformer", {
            "hidden_states": x, "encoder_hidden_states": embeds, "timestep": timestep,
            "img_ids": state["img_ids"], "txt_ids": state["txt_ids"], **state["lora"],
        })["noise_pred"]
        if refs is not None:  # the prediction for the noisy tokens only
            out = out.narrow(1, 0, latents.shape[1])
        out = out.float()
        if neg is None:
            return out
        cond_pred, uncond = out.chunk(2)
        return uncond + req.guidance * (cond_pred - uncond)

    def decode(self, latents, req, state):
        h, w = state["h"], state["w"]
        grid = latents.reshape(latents.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return self.backend.run("vae_decoder", {"latents": grid})["image"].float()

    def latent_grid(self, latents, state):
        return latents.reshape(state["h"], state["w"], -1).permute(2, 0, 1)  # batch 1

    def encode_pixels(self, image, noise, state):
        lat = self.run_vae_encoder({"image": image})  # (1, C, h, w), normalised, as references are encoded
        return lat.reshape(1, lat.shape[1], -1).permute(0, 2, 1)
