"""Step previews: the sampler's current estimate of the final image, as a small RGB picture after every step.

ComfyUI's "latent2rgb" previews multiply each latent position by a fixed channels -> RGB table per model family.
Here the map is fitted per bundle from the bundle's own VAE instead, once per loaded pipeline: seeded smooth random
colour fields at the bundle's smallest size go through the VAE encoder into the sampler's latent space, and a
ridge least-squares fit maps one latent position's channels to the colours of the VAE cells it covers
(vae_scale_factor pixels a side; 2 x 2 cells for FLUX.2 Klein's packed tokens, 1 for SD3.5). So any channel count,
patch size or VAE works. A bundle without the VAE encoder fits on seeded random latents and what its decoder
draws from them instead (rougher: random latents are not images' latents).

Each preview is of flow matching's denoised estimate x0 = x_t - sigma_t * v at one pixel per VAE cell (128 x 128
for a 1024 px image), computed on the device; only the small uint8 picture is copied to the host. It is an
approximation: colours and layout, not detail.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

MIN_DRAWS, MAX_DRAWS = 4, 32  # decoded latents in the fit: enough for 8 samples per fitted channel
RIDGE = 1e-3  # relative to the mean diagonal of the normal equations; keeps the fit stable with few samples


class LatentPreview:
    """latent grid (C, h, w) on the device -> (h*p, w*p, 3) uint8 on the host, p = cells per latent position."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, cells: int):
        self.weight, self.bias, self.cells = weight, bias, cells  # (C, p*p*3), (p*p*3,)

    @classmethod
    def fit(cls, pipe) -> LatentPreview:
        """Fitted from `pipe`'s own VAE at the bundle's smallest size (a few encoder or decoder runs)."""
        import torch.nn.functional as F

        from app.runtime.pipelines.base import GenerationRequest

        side = pipe.bundle.manifest["size_range"]["min"]
        vae_cell = int(pipe.bundle.manifest["pipeline"]["vae_scale_factor"])
        encoder = "vae_encoder" in pipe.bundle.components()
        req = pipe.resolve(GenerationRequest(prompt="", width=side, height=side, steps=1))
        xs, ys, draws, seed, cells = [], [], MIN_DRAWS, 0, 1
        while seed < draws:
            noise, state = pipe.initial_noise(replace(req, seed=seed))
            if encoder:  # latents of a smooth colour field: the statistics of an image's latents
                latents = pipe.encode_pixels(pipe.to_device(_colour_field(side, seed)), noise, state)
            else:
                latents = pipe.to_device(noise)
            image = pipe.decode(latents, req, state).float()  # what this decoder draws: (1, 3, H, W) in [-1, 1]
            grid = pipe.latent_grid(latents, state)  # (C, h, w)
            c, h, w = grid.shape
            cells = image.shape[-1] // w // vae_cell
            colour = F.avg_pool2d(image, vae_cell).squeeze(0)  # (3, h*p, w*p)
            colour = colour.reshape(3, h, cells, w, cells).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
            xs.append(grid.reshape(c, h * w).T)
            ys.append(colour)
            draws = min(MAX_DRAWS, max(MIN_DRAWS, math.ceil(8 * (c + 1) / (h * w))))
            seed += 1
        x = torch.cat(xs).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        y = torch.cat(ys).double()
        normal = x.T @ x
        normal += RIDGE * normal.diagonal().mean() * torch.eye(len(normal), dtype=x.dtype, device=x.device)
        weight, bias = torch.linalg.solve(normal, x.T @ y).float().split([len(normal) - 1, 1])
        return cls(weight, bias.reshape(-1), cells)

    def rgb(self, grid: torch.Tensor) -> np.ndarray:
        """The picture on the host: the one copy, of (h*p) x (w*p) x 3 bytes."""
        return self.picture(grid).cpu().numpy()

    def picture(self, grid: torch.Tensor) -> torch.Tensor:
        """The picture as uint8 where `grid` is (the device)."""
        c, h, w = grid.shape
        p = self.cells
        colour = grid.reshape(c, h * w).T.float() @ self.weight + self.bias  # (h*w, p*p*3)
        colour = colour.reshape(h, w, p, p, 3).permute(0, 2, 1, 3, 4).reshape(h * p, w * p, 3)
        return ((colour / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def _colour_field(side: int, seed: int) -> torch.Tensor:
    """(1, 3, side, side) in [-1, 1]: random colours on a coarse grid (2 to 16 a side), smoothly interpolated."""
    import torch.nn.functional as F

    g = torch.Generator("cpu").manual_seed(seed)
    coarse = 2 ** (1 + seed % 4)
    field = torch.rand((1, 3, coarse, coarse), generator=g) * 2 - 1
    return F.interpolate(field, size=(side, side), mode="bilinear", align_corners=False)
