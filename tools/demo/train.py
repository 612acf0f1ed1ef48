"""Train the embedded demo model (a tiny FLUX.2 Klein of the real diffusers classes) on synthetic shapes, on CPU.

Rerun it (about 45 minutes on the 2-core build machine; the weights depend only on --seed and --minutes):

    .venv/bin/python -m tools.demo.train --out assets/demo-model --seed 0 --minutes 50
    .venv/bin/python -m tools.demo.evaluate --model assets/demo-model      # adherence scores
    .venv/bin/python -m tools.demo.references --model assets/demo-model    # self-test reference PNGs

--minutes sets the step counts through fixed per-step costs measured on the 2-core build machine, so the same
arguments give the same weights on any machine (only the wall time differs). --cache DIR keeps the frozen text
encoder's prompt embeddings between runs (a pure cache: same numbers, less time). See docs/DEMO_MODEL.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from export.synthetic import KleinSize, build_klein, save
from tools.demo import shapes
from tools.demo.split import caption_pool
from tools.demo.text_encoder import set_weights as set_text_encoder

SIZE = KleinSize(
    heads=4, head_dim=32, double_layers=2, single_layers=2,
    text_hidden=64, text_layers=28, text_heads=4,
    vae_channels=(8, 16, 32, 64), vae_layers_per_block=1, vae_mid_attention=False, is_distilled=True,
    vae_norm_groups=1,  # one group: flat colour fields keep their absolute colour through the GroupNorms
)
TEXT_LEN = 64  # every caption with the chat template fits in 32 tokens; the bundle pads prompts to this length
DEFAULTS = {"steps": 4, "guidance": 1.0, "width": shapes.SIZE, "height": shapes.SIZE,
            "min_size": shapes.SIZE, "max_size": shapes.SIZE,  # trained at 128x128 only: other sizes are refused
            "max_sequence_length": TEXT_LEN}  # Flux2KleinPipeline's argument; the exporter carries it
# The sampler's schedule, stored in the model folder's scheduler config (so diffusers and every edgegen backend
# follow it): evenly spaced sigmas 1, 0.75, 0.5, 0.25 at the default 4 steps. Klein's dynamic shift (mu ~1.95 at
# 64 latent tokens) would visit 1, 0.95, 0.88, 0.70 and then jump to the image from 70 % noise, which paints the
# average of every shape that fits the caption: round blobs.
SCHEDULE = {"use_dynamic_shifting": False, "shift": 1.0}
SHAPE_WEIGHT = 3.0  # extra loss weight on the latent tokens the shape covers (an eighth of the image)
DIT_LR = 8e-4
KL_WEIGHT = 0.1  # strong enough that unused channels collapse and the decoder learns to tolerate noise

# Seconds per unit of work on the 2-core build machine (2 torch threads): they turn --minutes into step counts.
COST = {"caption": 0.1, "image": 0.02, "vae_crop": 0.25, "vae_full": 0.5, "dit": 0.2}


@dataclass(frozen=True)
class Plan:
    captions: int
    variants: int
    vae_crop_steps: int
    vae_full_steps: int
    dit_steps: int


def plan(minutes: float) -> Plan:
    """Step counts for a time budget: 5% text and images, 26% VAE, 58% transformer (a sixth at full length)."""
    s = 60.0 * minutes
    captions = max(32, min(768, int(0.04 * s / COST["caption"])))
    variants = max(2, min(3, int(0.02 * s / COST["image"] / captions)))
    return Plan(
        captions=captions, variants=variants,
        vae_crop_steps=max(10, int(0.23 * s / COST["vae_crop"])),
        vae_full_steps=max(2, int(0.03 * s / COST["vae_full"])),
        dit_steps=max(10, int(0.55 * s / COST["dit"])),
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

    key = hashlib.sha256(json.dumps([TEXT_LEN, captions]).encode())
    for name, t in sorted(pipe.text_encoder.state_dict().items()):
        key.update(name.encode() + t.numpy().tobytes())
    key.update(json.dumps(pipe.tokenizer.get_vocab(), sort_keys=True).encode())
    path = cache / f"embeds-{key.hexdigest()[:16]}.pt" if cache else None
    if path and path.exists():
        log(f"prompt embeddings from cache {path}")
        return torch.load(path)
    out = []
    for i in range(0, len(captions), 32):
        out.append(pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, captions[i : i + 32],
                                                 max_sequence_length=TEXT_LEN))
        if i % 320 == 0:
            log(f"text {i}/{len(captions)}")
    emb = torch.cat(out)
    if path:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(emb, path)
    return emb


def _shift(pipe, u: torch.Tensor, steps: int) -> torch.Tensor:
    """Uniform draws through the time shift the scheduler applies at inference."""
    c = pipe.scheduler.config
    if c.use_dynamic_shifting:
        m = math.exp(_mu(pipe, steps))
        return m / (m + (1 / u - 1))
    return c.shift * u / (1 + (c.shift - 1) * u)


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


@torch.no_grad()
def init_transformer(tr) -> None:
    """adaLN-zero start: every block and the output modulation are switched off, and the token projections in
    and out are identities, so the untrained model already predicts v = x_t (x0 = the latent mean at sigma 1)
    and training spends its steps on the image, not on learning to copy the noise through."""
    for mod in (tr.double_stream_modulation_img, tr.double_stream_modulation_txt, tr.single_stream_modulation,
                tr.norm_out):
        mod.linear.weight.zero_()
    eye = torch.eye(tr.inner_dim)
    tr.x_embedder.weight.copy_(eye)
    tr.proj_out.weight.copy_(eye)


def shape_tokens(images: torch.Tensor, cell: int = 16) -> torch.Tensor:
    """(N, tokens) 1.0 where a packed latent token's cell of pixels shows some of the shape, else 0.0."""
    bg = images[:, :, :1, :1].int()
    drawn = (images.int() - bg).abs().sum(dim=1) > 30  # (N, H, W)
    n, h, w = drawn.shape
    cells = drawn.view(n, h // cell, cell, w // cell, cell).any(dim=4).any(dim=2)
    return cells.reshape(n, -1).float()


def train_transformer(pipe, lat, emb, cap_of, weights, p: Plan, gen: torch.Generator, log, snapshot=None) -> dict:
    """Rectified flow on the pipeline's own inputs, tokens weighted by `weights`; returns EMA weights.
    snapshot(ema, step) is called at a quarter, half and three quarters of the run."""
    tr = pipe.transformer
    init_transformer(tr)
    tr.train()
    rope = tr.pos_embed
    tr.pos_embed = _CachedRope(rope)
    ema = {k: v.detach().clone() for k, v in tr.state_dict().items()}
    opt = torch.optim.AdamW(tr.parameters(), lr=DIT_LR, weight_decay=0.0, betas=(0.9, 0.99))
    sig_inf = inference_sigmas(pipe, DEFAULTS["steps"])
    img_ids = pipe._prepare_latent_ids(torch.zeros(1, 128, 8, 8))[0]
    txt_ids = pipe._prepare_text_ids(emb[:1])[0]
    total = p.dit_steps
    for step in range(total):
        b = 16
        idx = torch.randint(len(lat), (b,), generator=gen)
        e = emb[cap_of[idx]]
        x0 = lat[idx]
        pick = torch.randint(len(sig_inf), (b,), generator=gen)
        u = torch.rand(b, generator=gen).clamp(1e-3, 1.0)
        shifted = _shift(pipe, u, DEFAULTS["steps"])
        sigma = torch.where(torch.rand(b, generator=gen) < 0.5, sig_inf[pick], shifted)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        for g in opt.param_groups:
            g["lr"] = _lr(step, total, DIT_LR, 100)
        pred = tr(hidden_states=xt, encoder_hidden_states=e, timestep=sigma, img_ids=img_ids,
                  txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        w = weights[idx]
        loss = ((pred - (noise - x0)).pow(2).mean(dim=2) * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in tr.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        if step % 50 == 0 or step == total - 1:
            log(f"dit {step}/{total} loss {loss.item():.4f}")
        if snapshot and step in (total // 4, total // 2, 3 * total // 4):
            snapshot(ema, step)
    tr.pos_embed = rope
    tr.eval()
    return ema


def train(out: Path, seed: int, minutes: float, cache: Path | None = None, threads: int = 2) -> Path:
    """Build, train and save the demo model folder; returns it."""
    torch.set_num_threads(threads)
    log = _Log()
    p = plan(minutes)
    log(f"plan {asdict(p)}")
    torch.manual_seed(seed)
    pipe = build_klein(SIZE, corpus=tokenizer_corpus(), seed=seed)
    pipe.scheduler = pipe.scheduler.__class__.from_config({**pipe.scheduler.config, **SCHEDULE})
    set_text_encoder(pipe.text_encoder, pipe.tokenizer)
    gen = torch.Generator().manual_seed(seed)

    pool = caption_pool(p.captions)
    captions = [c for _, c, _ in pool]
    images = _to_tensor([shapes.variant(a, s, k) for s, _, a in pool for k in range(p.variants)])
    cap_of = torch.arange(len(pool)).repeat_interleave(p.variants)
    log(f"{len(captions)} captions, {len(images)} images")

    vae_key = hashlib.sha256(json.dumps([seed, threads, KL_WEIGHT, asdict(SIZE), asdict(p)["vae_crop_steps"],
                                         asdict(p)["vae_full_steps"]]).encode() + images.numpy().tobytes())
    vae_cached = cache / f"vae-{vae_key.hexdigest()[:16]}.pt" if cache else None
    from_cache = bool(vae_cached and vae_cached.exists())
    if from_cache:  # a pure cache: the same weights this run would train
        state = torch.load(vae_cached)
        pipe.vae.load_state_dict(state["vae"])
        gen.set_state(state["gen"])
        pipe.vae.eval()
        log(f"VAE from cache {vae_cached}")
    else:
        train_vae(pipe.vae, images, p, gen, log)
        if vae_cached:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save({"vae": pipe.vae.state_dict(), "gen": gen.get_state()}, vae_cached)
    lat = encode_latents(pipe, images)
    log(f"latents {tuple(lat.shape)}")
    emb = prompt_embeds(pipe, captions, cache, log)
    log(f"prompt embeddings {tuple(emb.shape)}")

    def snapshot(ema, step):  # for watching a long run: the EMA weights so far, as a model folder
        live = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
        pipe.transformer.load_state_dict(ema)
        _write(pipe, cache / "snapshot", {"seed": seed, "dit_step": step})
        pipe.transformer.load_state_dict(live)
        log(f"snapshot at dit step {step}: {cache / 'snapshot'}")

    weights = 1.0 + SHAPE_WEIGHT * shape_tokens(images, pipe.vae_scale_factor * 2)
    ema = train_transformer(pipe, lat, emb, cap_of, weights, p, gen, log, snapshot if cache else None)
    pipe.transformer.load_state_dict(ema)
    pipe.register_to_config(is_distilled=True)

    _write(pipe, out, {"seed": seed, "minutes": minutes, "threads": threads, "plan": asdict(p), "size": asdict(SIZE),
                       "train_minutes_wall": round((time.time() - log.t0) / 60, 1), "vae_from_cache": from_cache})
    log(f"saved {out}")
    return out


def _write(pipe, out: Path, training: dict) -> None:
    """The model folder, written beside its final place and renamed into it."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(pipe, tmp)
    (tmp / "edgegen_defaults.json").write_text(json.dumps(DEFAULTS, indent=2) + "\n")
    (tmp / "TRAINING.json").write_text(json.dumps(training, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=50.0)
    ap.add_argument("--cache", type=Path, default=None, help="keep prompt embeddings here between runs")
    ap.add_argument("--threads", type=int, default=2, choices=(1, 2),
                    help="torch threads (1: robust on a busy machine; weights are reproducible per thread count)")
    a = ap.parse_args(argv)
    train(a.out, a.seed, a.minutes, a.cache, a.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
