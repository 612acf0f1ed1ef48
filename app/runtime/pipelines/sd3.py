"""Stable Diffusion 3.5: CLIP-L + CLIP-G + T5 prompt embeddings, batched CFG, shifted flow-matching schedule."""

from __future__ import annotations

import torch

from app.runtime.pipelines.base import GenerationRequest, Pipeline

T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


class SD3Pipeline(Pipeline):
    def _clip(self, name: str, tokenizer: str, prompt: str):
        tok = self.tokenizer(tokenizer)
        limit = tok.model_max_length
        self.warn_truncation(tok, prompt, limit, "the prompt (CLIP)")
        ids = tok(prompt, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
        out = self.backend.run(name, {"input_ids": ids})
        return out["hidden"].float(), out["pooled"].float()

    def _t5(self, prompt: str) -> torch.Tensor:
        comps = self.bundle.components()
        if "text_encoder_3" not in comps:  # SD3 folders may ship without T5: the pipeline uses zeros
            dim = next(i for i in comps["transformer"]["inputs"] if i["name"] == "encoder_hidden_states")["shape"][-1]
            return torch.zeros(1, T5_TOKENS, dim)
        tok = self.tokenizer("tokenizer_3")
        self.warn_truncation(tok, prompt, T5_TOKENS, "the prompt (T5)")
        ids = tok(prompt, padding="max_length", max_length=T5_TOKENS, truncation=True, add_special_tokens=True,
                  return_tensors="pt").input_ids
        return self.backend.run("text_encoder_3", {"input_ids": ids})["hidden"].float()

    def _embed(self, prompt: str):
        h1, p1 = self._clip("text_encoder", "tokenizer", prompt)
        h2, p2 = self._clip("text_encoder_2", "tokenizer_2", prompt)
        t5 = self._t5(prompt)
        clip = torch.cat([h1, h2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([p1, p2], dim=-1)

    def encode(self, req: GenerationRequest):
        embeds, pooled = self._embed(req.prompt)
        if req.guidance > 1.0:  # CFG: [negative, positive] in one batch, as diffusers does
            neg, neg_pooled = self._embed(req.negative_prompt)
            return torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
        return embeds, pooled

    def initial_latents(self, req: GenerationRequest, cond):
        channels = next(i for i in self.bundle.components()["transformer"]["inputs"]
                        if i["name"] == "hidden_states")["shape"][1]
        scale = self.bundle.manifest["pipeline"]["vae_scale_factor"]
        return self.noise((1, channels, req.height // scale, req.width // scale), req.seed), {}

    def set_timesteps(self, scheduler, req, state):
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            cell = self.bundle.manifest["pipeline"]["vae_scale_factor"] * self.bundle.manifest["pipeline"]["patch"]
            seq = (req.height // cell) * (req.width // cell)
            c = scheduler.config
            kwargs["mu"] = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        scheduler.set_timesteps(req.steps, **kwargs)
        return scheduler.timesteps

    def predict(self, latents, t, req, cond, state):
        embeds, pooled = cond
        cfg = embeds.shape[0] == 2
        x = torch.cat([latents] * 2) if cfg else latents
        pred = self.backend.run("transformer", {
            "hidden_states": x, "encoder_hidden_states": embeds, "pooled_projections": pooled,
            "timestep": t.expand(x.shape[0]).float(),
        })["noise_pred"].float()
        if cfg:
            uncond, text = pred.chunk(2)
            pred = uncond + req.guidance * (text - uncond)
        return pred

    def decode(self, latents, req, state):
        return self.backend.run("vae_decoder", {"latents": latents})["image"].float()
