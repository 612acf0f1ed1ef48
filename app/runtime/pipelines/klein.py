"""FLUX.2 Klein: Qwen3 prompt embeddings, packed 128-channel latents, empirical-mu flow-matching schedule."""

from __future__ import annotations

import numpy as np
import torch

from app.runtime.pipelines.base import GenerationRequest, Pipeline

MAX_TOKENS = 512  # Flux2KleinPipeline pads every prompt to this length unless the bundle says otherwise


def text_ids(batch: int, length: int) -> torch.Tensor:
    """(0, 0, 0, l) per token, as Flux2KleinPipeline._prepare_text_ids builds them."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.unsqueeze(0).expand(batch, -1, -1)


def latent_ids(batch: int, h: int, w: int) -> torch.Tensor:
    """(0, y, x, 0) in raster order, as Flux2KleinPipeline._prepare_latent_ids builds them."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    return ids.unsqueeze(0).expand(batch, -1, -1)


class KleinPipeline(Pipeline):
    def _use_cfg(self, req: GenerationRequest) -> bool:
        return req.guidance > 1.0 and not self.bundle.manifest["pipeline"].get("is_distilled", False)

    def _embed(self, prompt: str) -> torch.Tensor:
        tok = self.tokenizer("tokenizer")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
        length = self.bundle.manifest["pipeline"].get("max_sequence_length", MAX_TOKENS)
        self.warn_truncation(tok, text, length, "the prompt")
        enc = tok(text, return_tensors="pt", padding="max_length", truncation=True, max_length=length)
        out = self.backend.run("text_encoder", {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out["prompt_embeds"].float()

    def encode(self, req: GenerationRequest):
        pos = self._embed(req.prompt)
        # Klein's base (non-distilled) pipeline uses an empty negative prompt for CFG; no user negative prompt.
        neg = self._embed("") if self._use_cfg(req) else None
        return pos, neg

    def initial_latents(self, req: GenerationRequest, cond):
        cell = self.bundle.manifest["pipeline"]["vae_scale_factor"] * 2  # pixels per packed token
        h, w = req.height // cell, req.width // cell
        noise = self.noise((1, 128, h, w), req.seed)
        packed = noise.reshape(1, 128, h * w).permute(0, 2, 1)
        return packed, {"h": h, "w": w, "img_ids": latent_ids(1, h, w), "txt_ids": text_ids(1, cond[0].shape[1])}

    def set_timesteps(self, scheduler, req, state):
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        sigmas = np.linspace(1.0, 1 / req.steps, req.steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=state["h"] * state["w"], num_steps=req.steps)
        scheduler.set_timesteps(req.steps, sigmas=sigmas, mu=mu)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler.timesteps

    def _transformer(self, latents, t, embeds, state):
        out = self.backend.run("transformer", {
            "hidden_states": latents, "encoder_hidden_states": embeds,
            "timestep": (t.expand(latents.shape[0]).to(latents.dtype) / 1000),
            "img_ids": state["img_ids"], "txt_ids": state["txt_ids"],
        })
        return out["noise_pred"].float()

    def predict(self, latents, t, req, cond, state):
        pos, neg = cond
        pred = self._transformer(latents, t, pos, state)
        if neg is not None:
            uncond = self._transformer(latents, t, neg, state)
            pred = uncond + req.guidance * (pred - uncond)
        return pred

    def decode(self, latents, req, state):
        h, w = state["h"], state["w"]
        grid = latents.reshape(latents.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return self.backend.run("vae_decoder", {"latents": grid})["image"].float()
