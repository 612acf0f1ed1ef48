"""Train the embedded demo model (a tiny FLUX.2 Klein of the real diffusers classes) on synthetic shapes, on CPU.

Rerun it (about 40 minutes on the 2-core build machine; the weights depend only on --seed and --minutes):

    .venv/bin/python -m app.demo.train --out assets/demo-model --seed 0 --minutes 40
    .venv/bin/python -m app.demo.evaluate --model assets/demo-model      # adherence scores
    .venv/bin/python -m app.demo.references --model assets/demo-model    # self-test reference PNGs

--minutes sets the step counts through fixed per-step costs measured on the 2-core build machine, so the same
arguments give the same weights on any machine (only the wall time differs). --cache DIR keeps the frozen text
encoder's prompt embeddings between runs (a pure cache: same numbers, less time). See docs/DEMO_MODEL.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from app.demo import shapes
from app.demo.split import caption_pool
from export.synthetic import KleinSize, build_klein, save

SIZE = KleinSize(
    heads=4, head_dim=32, double_layers=2, single_layers=2,
    text_hidden=32, text_layers=28, text_heads=2,
    vae_channels=(8, 16, 32, 64), vae_layers_per_block=1, vae_mid_attention=False, is_distilled=True,
    vae_norm_groups=1,  # one group: flat colour fields keep their absolute colour through the GroupNorms
)
DEFAULTS = {"steps": 4, "guidance": 1.0, "width": shapes.SIZE, "height": shapes.SIZE}
TEXT_LEN = 512  # Flux2KleinPipeline pads every prompt to max_sequence_length=512
HEAD_TOKENS, PAD_SAMPLE = 32, 32  # phase A text: the first 32 tokens (every caption fits) + 32 sampled pads
KL_WEIGHT = 0.1  # strong enough that unused channels collapse and the decoder learns to tolerate noise

# Seconds per unit of work on the 2-core build machine: they turn --minutes into step counts.
COST = {"caption": 0.25, "image": 0.04, "vae_crop": 0.45, "vae_full": 0.9, "dit_short": 0.7, "dit_full": 1.6}


@dataclass(frozen=True)
class Plan:
    captions: int
    variants: int
    vae_crop_steps: int
    vae_full_steps: int
    dit_short_steps: int
    dit_full_steps: int


def plan(minutes: float) -> Plan:
    """Step counts for a time budget: 8% text, 5% latents, 25% VAE, 56% transformer (a third at full length)."""
    s = 60.0 * minutes
    captions = max(32, min(800, int(0.08 * s / COST["caption"])))
    variants = max(2, min(4, int(0.05 * s / COST["image"] / captions)))
    return Plan(
        captions=captions, variants=variants,
        vae_crop_steps=max(10, int(0.23 * s / COST["vae_crop"])),
        vae_full_steps=max(2, int(0.02 * s / COST["vae_full"])),
        dit_short_steps=max(10, int(0.36 * s / COST["dit_short"])),
        dit_full_steps=max(4, int(0.20 * s / COST["dit_full"])),
    )


class _Log:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self, msg: str):
        print(f"[{(time.time() - self.t0) / 60:6.2f} min] {msg}", flush=True)


def tokenizer_corpus() -> list[str]:
    """Every caption the templates can write: the tokenizer learns whole words for all of them."""
    out = []
    for t in range(len(shapes.TEMPLATES)):
        for c in shapes.COLORS:
            for b in shapes.COLORS:
                for s in shapes.SHAPES:
                    for p in shapes.POSITIONS:
                        if c != b:
                            out.append(shapes.caption({"shape_color": c, "background": b, "shape": s, "position": p}, t))
    return sorted(set(out))


def _to_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def _pixels(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0  # what Flux2ImageProcessor feeds the VAE


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train_vae(vae, images: torch.Tensor, p: Plan, gen: torch.Generator, log) -> None:
    """Reconstruction + KL on 64x64 crops, then on whole images. Sampled latents keep the decoder robust."""
    with torch.no_grad():  # start with a narrow posterior, so the latent carries the image from the first step
        vae.quant_conv.bias[vae.config.latent_channels :] = -6.0
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    total = p.vae_crop_steps + p.vae_full_steps
    for step in range(total):
        crop = step < p.vae_crop_steps
        idx = torch.randint(len(images), (8 if crop else 4,), generator=gen)
        x = _pixels(images[idx])
        if crop:
            ox, oy = (int(v) * 8 for v in torch.randint(0, 9, (2,), generator=gen))
            x = x[:, :, oy : oy + 64, ox : ox + 64]
        for g in opt.param_groups:
            g["lr"] = _lr(step, total, 1e-3, 50)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == total - 1:
            log(f"vae {step}/{total} {'crop' if crop else 'full'} loss {loss.item():.4f} kl/px {kl.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    """Packed, batch-norm-normalised latents exactly as Flux2KleinPipeline builds them; sets the bn statistics.

    The statistics are those of the posterior samples the decoder was trained on (variance of the means plus
    the mean posterior variance): collapsed channels then normalise to ~0 instead of amplified noise.
    """
    vae = pipe.vae
    modes, variances = [], []
    for i in range(0, len(images), 32):
        post = vae.encode(_pixels(images[i : i + 32])).latent_dist
        modes.append(pipe._patchify_latents(post.mode()))
        variances.append(pipe._patchify_latents(post.var).mean(dim=(0, 2, 3)) * len(post.var))
    lat = torch.cat(modes)
    vae.bn.running_mean.copy_(lat.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(lat.var(dim=(0, 2, 3), unbiased=False) + sum(variances) / len(lat))
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return pipe._pack_latents((lat - mean) / std)


@torch.no_grad()
def prompt_embeds(pipe, captions: list[str], cache: Path | None, log) -> torch.Tensor:
    """Flux2KleinPipeline._get_qwen3_prompt_embeds for every caption (the encoder is frozen: computed once)."""
    import hashlib

    key = hashlib.sha256(json.dumps(captions).encode())
    for name, t in sorted(pipe.text_encoder.state_dict().items()):
        key.update(name.encode() + t.numpy().tobytes())
    key.update(json.dumps(pipe.tokenizer.get_vocab(), sort_keys=True).encode())
    path = cache / f"embeds-{key.hexdigest()[:16]}.pt" if cache else None
    if path and path.exists():
        log(f"prompt embeddings from cache {path}")
        return torch.load(path)
    out = []
    for i in range(0, len(captions), 32):
        out.append(pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, captions[i : i + 32]))
        if i % 320 == 0:
            log(f"text {i}/{len(captions)}")
    emb = torch.cat(out)
    if path:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(emb, path)
    return emb


def _mu(pipe, steps: int) -> float:
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=(shapes.SIZE // (pipe.vae_scale_factor * 2)) ** 2, num_steps=steps)


def inference_sigmas(pipe, steps: int) -> torch.Tensor:
    """The sigmas Flux2KleinPipeline visits at this step count for 128x128 (its mu, its scheduler)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import retrieve_timesteps

    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=_mu(pipe, steps))
    return sched.sigmas[:-1].float()


class _CachedRope(torch.nn.Module):
    """Training-time stand-in for the transformer's RoPE module: same angles, computed once, in float32."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cache = inner, {}

    def forward(self, ids):
        key = (tuple(ids.shape), ids.numpy().tobytes())
        if key not in self.cache:
            self.cache[key] = tuple(t.float() for t in self.inner(ids))
        return self.cache[key]


def train_transformer(pipe, lat, emb, cap_of, p: Plan, gen: torch.Generator, log) -> dict:
    """Rectified flow on the pipeline's own inputs; returns EMA weights."""
    tr = pipe.transformer
    tr.train()
    rope = tr.pos_embed
    tr.pos_embed = _CachedRope(rope)
    ema = {k: v.detach().clone() for k, v in tr.state_dict().items()}
    opt = torch.optim.AdamW(tr.parameters(), lr=8e-4, weight_decay=0.0, betas=(0.9, 0.99))
    sig_inf = inference_sigmas(pipe, DEFAULTS["steps"])
    mu = _mu(pipe, DEFAULTS["steps"])  # the pipeline's time shift, applied to uniform draws
    img_ids = pipe._prepare_latent_ids(torch.zeros(1, 128, 8, 8))[0]
    txt_ids = pipe._prepare_text_ids(emb[:1])[0]
    total = p.dit_short_steps + p.dit_full_steps
    pads = torch.arange(HEAD_TOKENS, TEXT_LEN)
    for step in range(total):
        short = step < p.dit_short_steps
        b = 16 if short else 8
        idx = torch.randint(len(lat), (b,), generator=gen)
        if short:  # the caption's tokens plus a sample of its padding, each at its true position
            keep = torch.cat([torch.arange(HEAD_TOKENS), pads[torch.randperm(len(pads), generator=gen)[:PAD_SAMPLE]]])
        else:
            keep = torch.arange(TEXT_LEN)
        e = emb[cap_of[idx]][:, keep]
        x0 = lat[idx]
        pick = torch.randint(len(sig_inf), (b,), generator=gen)
        u = torch.rand(b, generator=gen).clamp(1e-3, 1.0)
        shifted = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        sigma = torch.where(torch.rand(b, generator=gen) < 0.5, sig_inf[pick], shifted)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for g in opt.param_groups:
            g["lr"] = _lr(step, total, 8e-4, 100)
        pred = tr(hidden_states=xt, encoder_hidden_states=e, timestep=sigma, img_ids=img_ids,
                  txt_ids=txt_ids[keep], guidance=None, return_dict=False)[0]
        loss = (pred - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in tr.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        if step % 50 == 0 or step == total - 1:
            log(f"dit {step}/{total} {'short' if short else 'full'} loss {loss.item():.4f}")
    tr.pos_embed = rope
    tr.eval()
    return ema


def train(out: Path, seed: int, minutes: float, cache: Path | None = None, threads: int = 1) -> Path:
    """Build, train and save the demo model folder; returns it."""
    torch.set_num_threads(threads)
    log = _Log()
    p = plan(minutes)
    log(f"plan {asdict(p)}")
    torch.manual_seed(seed)
    pipe = build_klein(SIZE, corpus=tokenizer_corpus(), seed=seed)
    gen = torch.Generator().manual_seed(seed)

    pool = caption_pool(p.captions)
    captions = [c for _, c, _ in pool]
    images = _to_tensor([shapes.variant(a, s, k) for s, _, a in pool for k in range(p.variants)])
    cap_of = torch.arange(len(pool)).repeat_interleave(p.variants)
    log(f"{len(captions)} captions, {len(images)} images")

    train_vae(pipe.vae, images, p, gen, log)
    lat = encode_latents(pipe, images)
    log(f"latents {tuple(lat.shape)}")
    emb = prompt_embeds(pipe, captions, cache, log)
    log(f"prompt embeddings {tuple(emb.shape)}")

    ema = train_transformer(pipe, lat, emb, cap_of, p, gen, log)
    pipe.transformer.load_state_dict(ema)
    pipe.register_to_config(is_distilled=True)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(pipe, tmp)
    (tmp / "edgegen_defaults.json").write_text(json.dumps(DEFAULTS, indent=2) + "\n")
    (tmp / "TRAINING.json").write_text(json.dumps(
        {"seed": seed, "minutes": minutes, "threads": threads, "plan": asdict(p), "size": asdict(SIZE),
         "train_minutes_wall": round((time.time() - log.t0) / 60, 1)}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"saved {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--cache", type=Path, default=None, help="keep prompt embeddings here between runs")
    ap.add_argument("--threads", type=int, default=1, choices=(1, 2),
                    help="torch threads (1: robust on a busy machine; weights are reproducible per thread count)")
    a = ap.parse_args(argv)
    train(a.out, a.seed, a.minutes, a.cache, a.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
