"""benchmarks/gpu_klein4b.py --smoke on CPU: the script runs end to end, its FLOP count is exact, and the
fallback reimplementation (for machines without diffusers) has diffusers' parameter and FLOP counts.

The script's GPU modes have never run here (no GPU on the build machine); this only keeps its shared code paths
(model build, inputs, analytic FLOPs, timing, table, JSON) from rotting. The FP8 Q/DQ ONNX part of the smoke run
is skipped (a dynamo export, ~20 s); `python benchmarks/gpu_klein4b.py --smoke` runs it by hand. The script run as
a user runs it happens once, inside benchmarks/gpu_acceptance.py --smoke (tests/test_gpu_acceptance_smoke.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_klein4b.py"


def _script_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_klein4b", SCRIPT)
    g = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = g  # its dataclasses look their module up
    try:
        spec.loader.exec_module(g)
    finally:
        del sys.modules[spec.name]
    return g


def test_flop_count_is_exact_and_fallback_matches_diffusers():
    """Analytic FLOPs == torch's flop counter for diffusers' module and the fallback (smoke size); at the real
    Klein 4B config (meta device, no memory) both modules hold the same parameters."""
    import torch
    from diffusers import Flux2Transformer2DModel

    g = _script_module()
    args, img_tokens = g.inputs(g.SMOKE, 128, 32, 1, "cpu", torch.float32)
    analytic = g.flops_per_step(g.SMOKE, img_tokens, 32)["total"]
    for mini in (False, True):
        model, impl = g.build(g.SMOKE, "cpu", torch.float32, force_mini=mini)
        assert g.counted_flops(model, args) == pytest.approx(analytic, rel=1e-9), impl
    c = g.KLEIN_4B
    with torch.device("meta"):
        mini = g.MiniFlux2(c)
        ref = Flux2Transformer2DModel(
            patch_size=1, in_channels=c.in_channels, num_layers=c.double, num_single_layers=c.single,
            attention_head_dim=c.head_dim, num_attention_heads=c.heads, joint_attention_dim=c.joint_attention_dim,
            timestep_guidance_channels=c.timestep_channels, mlp_ratio=c.mlp_ratio, axes_dims_rope=c.axes,
            rope_theta=c.rope_theta, eps=c.eps, guidance_embeds=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(mini) == count(ref)
    assert 3.8e9 < count(ref) < 4.0e9
    # 1024x1024: 4096 image + 512 text tokens
    assert g.flops_per_step(c, 4096, 512)["total"] == pytest.approx(34.82e12, rel=1e-3)
