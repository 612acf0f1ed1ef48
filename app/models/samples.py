"""Example inputs per family and component, for tracing the ONNX export and checking it against PyTorch."""

from __future__ import annotations

import torch


def _klein_samples(pipe, component: str, batch: int, h: int, w: int, text_len: int):
    g = torch.Generator("cpu").manual_seed(batch * 1000 + h * 31 + w)
    if component == "text_encoder":
        vocab = pipe.text_encoder.config.vocab_size
        ids = torch.randint(0, vocab, (batch, text_len), generator=g)
        mask = torch.ones(batch, text_len, dtype=torch.int64)
        mask[-1, text_len // 2 :] = 0  # padding, as the pipeline pads every prompt to max length
        return {"input_ids": ids, "attention_mask": mask}
    if component == "transformer":
        cfg = pipe.transformer.config
        grid = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
        txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_len))
        return {
            "hidden_states": torch.randn(batch, h * w, cfg.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
            "timestep": torch.rand(batch, generator=g),
            "img_ids": grid.unsqueeze(0).expand(batch, -1, -1).contiguous(),
            "txt_ids": txt.unsqueeze(0).expand(batch, -1, -1).contiguous(),
        }
    if component == "vae_decoder":
        packed = pipe.vae.config.latent_channels * 4  # 2x2-patchified latents, as the transformer sees them
        return {"latents": torch.randn(batch, packed, h, w, generator=g)}
    if component == "vae_encoder":  # an image whose packed grid is h x w
        cell = _vae_scale(pipe) * 2
        return {"image": torch.rand(batch, 3, h * cell, w * cell, generator=g) * 2 - 1}
    raise KeyError(component)


def _vae_scale(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # as diffusers derives vae_scale_factor


def _sd3_samples(pipe, component: str, batch: int, h: int, w: int, text_len: int):
    g = torch.Generator("cpu").manual_seed(batch * 1000 + h * 31 + w)
    if component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, component)
        n = min(text_len, getattr(module.config, "max_position_embeddings", text_len))
        return {"input_ids": torch.randint(0, module.config.vocab_size, (batch, n), generator=g)}
    if component == "transformer":
        cfg = pipe.transformer.config
        return {
            "hidden_states": torch.randn(batch, cfg.in_channels, h, w, generator=g),
            "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.rand(batch, generator=g) * 1000,
        }
    if component.startswith("controlnet_"):  # one of export --controlnet's nets, as owner.controlnet
        cfg = pipe.controlnet.config
        out = {"hidden_states": torch.randn(batch, cfg.in_channels, h, w, generator=g),
               "controlnet_cond": torch.randn(batch, cfg.in_channels, h, w, generator=g)}
        if cfg.joint_attention_dim is not None:
            out["encoder_hidden_states"] = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
        return {**out, "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                "timestep": torch.rand(batch, generator=g) * 1000}
    if component == "vae_decoder":
        return {"latents": torch.randn(batch, pipe.vae.config.latent_channels, h, w, generator=g)}
    if component == "vae_encoder":  # an image whose latent grid is h x w, and the posterior's sampling noise
        cell = _vae_scale(pipe)
        return {"image": torch.rand(batch, 3, h * cell, w * cell, generator=g) * 2 - 1,
                "noise": torch.randn(batch, pipe.vae.config.latent_channels, h, w, generator=g)}
    raise KeyError(component)



# family name -> (owner, component, batch, rows, cols, text_len) -> example inputs; rows/cols are the grid the
# transformer and decoder see (Klein: packed tokens; SD3: latent pixels)
SAMPLE_INPUTS = {"flux2-klein": _klein_samples, "sd3.5": _sd3_samples}


def sample_inputs(family: str, owner, component: str, batch: int, rows: int, cols: int, text_len: int,
                  spec=None):
    """Example inputs; with `spec`, also its ControlNet residual stack (a transformer of a bundle with nets)."""
    out = SAMPLE_INPUTS[family](owner, component, batch, rows, cols, text_len)
    extra = [t for t in (spec.inputs if spec is not None else ()) if t.name == "controlnet_residuals"]
    if extra:
        layers, _b, _seq, inner = extra[0].dims
        g = torch.Generator("cpu").manual_seed(rows * 7 + cols)
        patch = owner.transformer.config.patch_size
        out[extra[0].name] = torch.randn(layers, batch, (rows // patch) * (cols // patch), inner, generator=g) * 0.1
    return out
