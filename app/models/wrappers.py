"""Thin nn.Module wrappers that give each diffusers/transformers module the bundle's tensor interface.

The same wrappers are traced by the ONNX exporter and run by the PyTorch reference backend, so both see
exactly the same computation.
"""

from __future__ import annotations

import torch
from torch import nn

from app.bundle.families import KLEIN_TEXT_LAYERS


class Fp32RopePosEmbed(nn.Module):
    """Flux2PosEmbed computed in float32: diffusers uses float64 on CPU, which ONNX Runtime's Cos lacks and
    which TensorRT would run slowly. Positions are small integers, so float32 loses nothing measurable."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.theta, self.axes_dim = inner.theta, inner.axes_dim

    def forward(self, ids: torch.Tensor):
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        pos = ids.float()
        cos_out, sin_out = [], []
        for i, dim in enumerate(self.axes_dim):
            cos, sin = get_1d_rotary_pos_embed(
                dim, pos[..., i], theta=self.theta, repeat_interleave_real=True, use_real=True,
                freqs_dtype=torch.float32,
            )
            cos_out.append(cos)
            sin_out.append(sin)
        return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


class KleinTextEncoder(nn.Module):
    """Qwen3 hidden states of the chosen layers, stacked as Flux2KleinPipeline._get_qwen3_prompt_embeds does."""

    def __init__(self, text_encoder: nn.Module, layers: tuple[int, ...] = KLEIN_TEXT_LAYERS):
        super().__init__()
        self.text_encoder, self.layers = text_encoder, tuple(layers)

    def forward(self, input_ids, attention_mask):
        out = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
        x = torch.stack([out.hidden_states[k] for k in self.layers], dim=1)
        b, c, s, d = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, s, c * d)


class KleinTransformer(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        if not isinstance(transformer.pos_embed, Fp32RopePosEmbed):
            transformer.pos_embed = Fp32RopePosEmbed(transformer.pos_embed)

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids):
        return self.transformer(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
            img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False,
        )[0]


class KleinVaeDecoder(nn.Module):
    """Packed latents (4 x the VAE's latent_channels) -> image in [-1, 1]: batch-norm de-normalisation, 2x2 unpatchify, decode."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        x = latents * std + mean
        b, c, h, w = x.shape
        x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
        return self.vae.decode(x, return_dict=False)[0]


def _patchify(latents):
    """Flux2KleinPipeline._patchify_latents: (B, C, H, W) -> (B, 4C, H/2, W/2)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


class KleinVaeEncoder(nn.Module):
    """Image in [-1, 1] -> packed, normalised reference latents, as Flux2KleinPipeline._encode_vae_image: the
    posterior's mode (sample_mode="argmax"), 2x2 patchify, then (x - bn.running_mean) / sqrt(running_var + eps)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        latents = _patchify(self.vae.encode(image).latent_dist.mode())
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        return (latents - mean) / std


class SD3VaeEncoder(nn.Module):
    """Image in [-1, 1] + standard-normal noise -> scaled init latents, as StableDiffusion3Img2ImgPipeline:
    latent_dist.sample(generator) is mean + std * noise (the noise drawn on the host from the request's
    generator, first), then (x - shift_factor) * scaling_factor."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image, noise):
        dist = self.vae.encode(image).latent_dist
        x = dist.mean + dist.std * noise
        cfg = self.vae.config
        return (x - cfg.shift_factor) * cfg.scaling_factor


class ClipTextEncoder(nn.Module):
    """CLIPTextModelWithProjection -> (pooled projection, penultimate hidden state), as SD3 uses them."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return out[0], out.hidden_states[-2]


class T5TextEncoder(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)[0]


def _tensor_crop(self, height, width):
    """PatchEmbed.cropped_pos_embed with the centre offsets computed as tensors.

    The dynamo exporter turns the original's symbolic `(max - w) // 2 + w` into a truncating ONNX Div on a
    negative numerator, which is off by one for odd patch counts (seen: 48 px wide -> wrong crop). Index
    arithmetic on tensors is exported literally, and gives the same values."""
    m, p = self.pos_embed_max_size, self.patch_size
    h, w = height // p, width // p
    grid = self.pos_embed.reshape(1, m, m, -1)
    top = torch.div(m - torch.full((), h, dtype=torch.int64), 2, rounding_mode="floor")
    left = torch.div(m - torch.full((), w, dtype=torch.int64), 2, rounding_mode="floor")
    grid = grid.index_select(1, torch.arange(h) + top).index_select(2, torch.arange(w) + left)
    return grid.reshape(1, -1, grid.shape[-1])


class SD3Transformer(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        pe = transformer.pos_embed
        if getattr(pe, "pos_embed_max_size", None) is not None:
            pe.cropped_pos_embed = _tensor_crop.__get__(pe)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.transformer(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, timestep=timestep, return_dict=False,
        )[0]


class SD3TransformerControlNet(SD3Transformer):
    """The transformer of a bundle with ControlNets: the residual stack (controlnet_layers, B, tokens, inner),
    already scaled and summed over the request's nets, goes in as diffusers' block_controlnet_hidden_states (the
    per-block index int(i / interval) is computed at trace time from the fixed stack length)."""

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, controlnet_residuals):
        return self.transformer(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, timestep=timestep,
            block_controlnet_hidden_states=list(controlnet_residuals.unbind(0)), return_dict=False,
        )[0]


class SD3ControlNet(nn.Module):
    """SD3ControlNetModel -> its per-layer residuals stacked, unscaled (the driver applies the conditioning scale
    and the start/end window per step, so one graph serves every scale)."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet
        for pe in (controlnet.pos_embed,):
            if pe is not None and getattr(pe, "pos_embed_max_size", None) is not None:
                pe.cropped_pos_embed = _tensor_crop.__get__(pe)

    def _run(self, hidden_states, controlnet_cond, encoder_hidden_states, pooled_projections, timestep):
        out = self.controlnet(hidden_states=hidden_states, controlnet_cond=controlnet_cond, conditioning_scale=1.0,
                              encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                              timestep=timestep, return_dict=False)[0]
        return torch.stack(list(out))

    def forward(self, hidden_states, controlnet_cond, encoder_hidden_states, pooled_projections, timestep):
        return self._run(hidden_states, controlnet_cond, encoder_hidden_states, pooled_projections, timestep)


class SD3ControlNetSingle(SD3ControlNet):
    """SD3.5 Large's ControlNets (joint_attention_dim null): single blocks, no prompt embeddings."""

    def forward(self, hidden_states, controlnet_cond, pooled_projections, timestep):
        return self._run(hidden_states, controlnet_cond, None, pooled_projections, timestep)


class SD3VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        cfg = self.vae.config
        return self.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]


WRAPPERS = {
    "klein_text_encoder": KleinTextEncoder,
    "klein_transformer": KleinTransformer,
    "klein_vae_decoder": KleinVaeDecoder,
    "klein_vae_encoder": KleinVaeEncoder,
    "sd3_vae_encoder": SD3VaeEncoder,
    "clip_text_encoder": ClipTextEncoder,
    "t5_text_encoder": T5TextEncoder,
    "sd3_transformer": SD3Transformer,
    "sd3_vae_decoder": SD3VaeDecoder,
    "sd3_transformer_controlnet": SD3TransformerControlNet,
    "sd3_controlnet": SD3ControlNet,
    "sd3_controlnet_single": SD3ControlNetSingle,
}


def lora_slots(transformer: nn.Module) -> list[dict]:
    """The layers a run-time LoRA can target: every nn.Linear of the transformer, in module order, named as
    LoRA files name them (diffusers' module paths: `transformer_blocks.0.attn.to_q`)."""
    return [{"module": n, "in": m.in_features, "out": m.out_features}
            for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]


class LoraSlots(nn.Module):
    """A transformer wrapper with a low-rank side branch on each slot's nn.Linear: y = W x + B (A x).

    A (rank x in) and B (out x rank) are extra inputs after the wrapper's own, one pair per slot, so the graph
    and its engines serve any LoRA, or several at once, with no rebuild. The branch is a forward hook: it
    survives ModelOpt's module conversion (FP8 calibration) and adds nothing when the hooks are not armed."""

    def __init__(self, inner: nn.Module, n_base: int, slots: list[dict]):
        super().__init__()
        self.inner, self.n_base = inner, n_base
        self._armed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.slots = [s["module"] for s in slots]
        for i, name in enumerate(self.slots):
            inner.transformer.get_submodule(name).register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def add_branch(_module, args, out):
            if i not in self._armed:
                return out
            a, b = self._armed[i]
            x = args[0]
            return out + torch.matmul(torch.matmul(x, a.to(x.dtype).t()), b.to(x.dtype).t())
        return add_branch

    def run(self, *args):
        lora = args[self.n_base:]
        self._armed = {i: (lora[2 * i], lora[2 * i + 1]) for i in range(len(self.slots))}
        try:
            return self.inner(*args[: self.n_base])
        finally:
            self._armed = {}


def wrap(spec, module: nn.Module, slots: list[dict] | None = None) -> nn.Module:
    """The family wrapper; with `slots` (a run-time LoRA bundle's transformer) inside LoraSlots."""
    inner = WRAPPERS[spec.wrapper](module)
    if slots:
        n_base = sum(not t.name.startswith("lora_") for t in spec.inputs)
        inner = _named_forward(LoraSlots, tuple(t.name for t in spec.inputs))(inner, n_base, slots)
    return inner.eval()


def _named_forward(base: type, names: tuple[str, ...], name: str | None = None) -> type:
    """A subclass of `base` whose forward takes `names` as parameters and calls base.run with them: the
    exporter needs a fixed signature, one parameter per graph input."""
    ns: dict = {}
    exec(f"def forward(self, {', '.join(names)}):\n    return self.run({', '.join(names)})", ns)  # noqa: S102
    return type(name or base.__name__, (base,), {"forward": ns["forward"]})


class _Boundary(nn.Module):
    """A wrapper run in a half dtype whose tensors cross its boundary in FP32: floating inputs are cast to
    `dtype` on the way in (except those named in `keep`), outputs to FP32 on the way out. The bundle's I/O
    stays FP32 whatever the graph's precision, so the runtime feeds and reads every bundle alike."""

    def __init__(self, inner: nn.Module, names: tuple[str, ...], dtype: torch.dtype, keep: frozenset[str]):
        super().__init__()
        self.inner, self.names, self.dtype_, self.keep = inner, names, dtype, keep

    def run(self, *args):
        args = [a.to(self.dtype_) if a.is_floating_point() and n not in self.keep else a
                for a, n in zip(args, self.names)]
        out = self.inner(*args)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def wrap_in_dtype(spec, module: nn.Module, dtype: torch.dtype, keep=frozenset(),
                  slots: list[dict] | None = None) -> nn.Module:
    """wrap(spec, module) for a module loaded in `dtype`, with FP32 tensors at its boundary (see _Boundary).
    The forward takes the spec's input names as its parameters: the exporter needs a fixed signature."""
    names = tuple(t.name for t in spec.inputs)
    cls = _named_forward(_Boundary, names, f"{WRAPPERS[spec.wrapper].__name__}In{str(dtype).split('.')[-1]}")
    return cls(wrap(spec, module, slots), names, dtype, frozenset(keep)).eval()
