"""Per-step latency of the FLUX.2 Klein 4B transformer on one GPU: eager, torch.compile, FP8; VRAM; % of peak.

Self-contained: needs only torch. diffusers is used when importable (its Flux2Transformer2DModel, the exact
module edgegen exports); otherwise a minimal reimplementation of the same compute below (`MiniFlux2`:
same layers, shapes, modulation, SwiGLU, QK-RMSNorm, 4-axis RoPE, parallel single blocks; weight names
differ). The table says which one ran. Weights are random BF16 at the released Klein 4B config
(5 double + 20 single blocks, 24 heads x 128, joint_attention_dim 7680, 128 latent channels): latency does
not depend on the values.

Modes:
  eager      the module as is, BF16, SDPA attention
  compile    torch.compile(module) (default mode), same inputs
  fp8-torch  every block Linear through torch._scaled_mm with per-tensor E4M3 scales (dynamic activation
             scale), compiled: what FP8 tensor cores give without TensorRT (needs SM >= 8.9)
  trt-fp8    TensorRT strongly typed engine from an ONNX export with explicit FP8 Q/DQ on every block
             MatMul (only if `tensorrt` imports; weights and activation scales from one calibration pass)

    python benchmarks/gpu_klein4b.py                  # 1024x1024, 512 text tokens, all modes available
    python benchmarks/gpu_klein4b.py --modes eager,compile --size 768
    python benchmarks/gpu_klein4b.py --smoke          # CPU, tiny width: checks the code paths and FLOP count

FLOPs/step are counted analytically (matmuls and attention, 2 FLOPs per multiply-add) and, in --smoke,
cross-checked with torch.utils.flop_counter. Peak = the vendor's dense BF16 / FP8 tensor throughput for the
GPU by name (table below; --peak-tflops overrides). VRAM = NVML's used memory on the device (pynvml) and
torch's max allocated. Budget: the whole run stops starting new modes after --budget-s (default 420 s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class KleinConfig:
    in_channels: int = 128
    double: int = 5
    single: int = 20
    heads: int = 24
    head_dim: int = 128
    joint_attention_dim: int = 7680
    mlp_ratio: float = 3.0
    timestep_channels: int = 256
    axes: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: int = 2000
    eps: float = 1e-6

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def mlp(self) -> int:
        return int(self.dim * self.mlp_ratio)


KLEIN_4B = KleinConfig()
SMOKE = KleinConfig(double=1, single=2, heads=2, head_dim=32, joint_attention_dim=96, axes=(8, 8, 8, 8))

# Dense tensor-core peaks, TFLOPS (vendor datasheets; no sparsity): (bf16, fp8). None: no FP8 tensor cores.
PEAKS = {
    "H200": (989.4, 1978.9), "H100 SXM": (989.4, 1978.9), "H100 NVL": (835.0, 1670.0), "H100 PCIe": (756.0, 1513.0),
    "H100": (989.4, 1978.9), "GH200": (989.4, 1978.9), "B200": (2250.0, 4500.0), "A100": (312.0, None),
    "A10": (125.0, None), "L40S": (362.1, 733.0), "L40": (181.0, 362.0), "L4": (121.0, 242.5),
    "RTX 6000 Ada": (364.2, 728.5), "RTX PRO 6000": (503.8, 1007.6), "RTX 5090": (209.5, 419.0),
    "RTX 4090": (165.2, 330.3), "RTX 4080": (97.5, 194.9), "RTX 3090": (71.0, None),
}


def flops_per_step(cfg: KleinConfig, img_tokens: int, txt_tokens: int, batch: int = 1) -> dict[str, float]:
    """Matmul + attention FLOPs of one transformer forward (2 per multiply-add); elementwise ops excluded."""
    d, m, s = cfg.dim, cfg.mlp, img_tokens + txt_tokens
    lin = lambda tokens, k, n: 2.0 * tokens * k * n  # noqa: E731
    double_lin = sum(lin(t, d, 3 * d) + lin(t, d, d) + lin(t, d, 2 * m) + lin(t, m, d) for t in (img_tokens, txt_tokens))
    single_lin = lin(s, d, 3 * d + 2 * m) + lin(s, d + m, d)
    attn = 2 * 2.0 * s * s * d  # QK^T and PV
    embed = lin(img_tokens, cfg.in_channels, d) + lin(txt_tokens, cfg.joint_attention_dim, d) + lin(img_tokens, d, cfg.in_channels)
    mods = 2.0 * (cfg.timestep_channels * d + d * d + d * 6 * d * 2 + d * 3 * d + d * 2 * d)  # per sample, tiny
    out = {
        "double_blocks": cfg.double * (double_lin + attn),
        "single_blocks": cfg.single * (single_lin + attn),
        "embed_out": embed + mods,
    }
    out = {k: v * batch for k, v in out.items()}
    out["attention_share"] = (cfg.double + cfg.single) * attn * batch / sum(out.values())
    out["total"] = out["double_blocks"] + out["single_blocks"] + out["embed_out"]
    return out


# --------------------------------------------------------------------- minimal reimplementation (fallback)
def _rope(ids: torch.Tensor, axes, theta) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = [], []
    for i, dim in enumerate(axes):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=ids.device, dtype=torch.float32) / dim))
        f = ids[:, i].float()[:, None] * freqs[None]
        cos.append(f.cos().repeat_interleave(2, dim=-1))
        sin.append(f.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos, -1), torch.cat(sin, -1)


def _apply_rope(x, cos, sin):  # x: B, S, H, D (interleaved real/imag pairs, as diffusers' use_real path)
    xr, xi = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-xi, xr], -1).flatten(3)
    return (x.float() * cos[None, :, None] + rot * sin[None, :, None]).to(x.dtype)


def _attention(q, k, v):  # B, S, H, D
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class _SwiGLUFF(nn.Module):
    def __init__(self, d, m):
        super().__init__()
        self.linear_in, self.linear_out = nn.Linear(d, 2 * m, bias=False), nn.Linear(m, d, bias=False)

    def forward(self, x):
        a, b = self.linear_in(x).chunk(2, -1)
        return self.linear_out(F.silu(a) * b)


class _Double(nn.Module):
    def __init__(self, c: KleinConfig):
        super().__init__()
        d, self.c = c.dim, c
        self.qkv, self.add_qkv = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, 3 * d, bias=False)
        self.out, self.add_out = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.nq, self.nk, self.naq, self.nak = (nn.RMSNorm(c.head_dim, eps=c.eps) for _ in range(4))
        self.ff, self.ff_context = _SwiGLUFF(d, c.mlp), _SwiGLUFF(d, c.mlp)

    def forward(self, x, ctx, mod_img, mod_txt, cos, sin):
        (s1, sc1, g1, s2, sc2, g2), (cs1, csc1, cg1, cs2, csc2, cg2) = mod_img.chunk(6, -1), mod_txt.chunk(6, -1)
        ln = lambda t: F.layer_norm(t, t.shape[-1:], eps=self.c.eps)  # noqa: E731
        h = ln(x) * (1 + sc1) + s1
        hc = ln(ctx) * (1 + csc1) + cs1
        split = lambda t: t.unflatten(-1, (-1, self.c.head_dim))  # noqa: E731
        q, k, v = (split(t) for t in self.qkv(h).chunk(3, -1))
        cq, ck, cv = (split(t) for t in self.add_qkv(hc).chunk(3, -1))
        q = torch.cat([self.naq(cq), self.nq(q)], 1)
        k = torch.cat([self.nak(ck), self.nk(k)], 1)
        v = torch.cat([cv, v], 1)
        a = _attention(_apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v).flatten(2)
        ac, ai = a.split([ctx.shape[1], x.shape[1]], 1)
        x = x + g1 * self.out(ai)
        x = x + g2 * self.ff(ln(x) * (1 + sc2) + s2)
        ctx = ctx + cg1 * self.add_out(ac)
        ctx = ctx + cg2 * self.ff_context(ln(ctx) * (1 + csc2) + cs2)
        return x, ctx


class _Single(nn.Module):
    def __init__(self, c: KleinConfig):
        super().__init__()
        self.c = c
        self.to_qkv_mlp_proj = nn.Linear(c.dim, 3 * c.dim + 2 * c.mlp, bias=False)
        self.to_out = nn.Linear(c.dim + c.mlp, c.dim, bias=False)
        self.nq, self.nk = nn.RMSNorm(c.head_dim, eps=c.eps), nn.RMSNorm(c.head_dim, eps=c.eps)

    def forward(self, x, mod, cos, sin):
        shift, scale, gate = mod.chunk(3, -1)
        h = F.layer_norm(x, x.shape[-1:], eps=self.c.eps) * (1 + scale) + shift
        qkv, mlp = self.to_qkv_mlp_proj(h).split([3 * self.c.dim, 2 * self.c.mlp], -1)
        q, k, v = (t.unflatten(-1, (-1, self.c.head_dim)) for t in qkv.chunk(3, -1))
        a = _attention(_apply_rope(self.nq(q), cos, sin), _apply_rope(self.nk(k), cos, sin), v).flatten(2)
        m1, m2 = mlp.chunk(2, -1)
        return x + gate * self.to_out(torch.cat([a, F.silu(m1) * m2], -1))


class MiniFlux2(nn.Module):
    """Flux2Transformer2DModel's forward (no guidance embed, no KV cache), for when diffusers is absent."""

    def __init__(self, c: KleinConfig):
        super().__init__()
        d, self.c = c.dim, c
        self.t1, self.t2 = nn.Linear(c.timestep_channels, d, bias=False), nn.Linear(d, d, bias=False)
        self.mod_img, self.mod_txt = nn.Linear(d, 6 * d, bias=False), nn.Linear(d, 6 * d, bias=False)
        self.mod_single = nn.Linear(d, 3 * d, bias=False)
        self.x_embedder = nn.Linear(c.in_channels, d, bias=False)
        self.context_embedder = nn.Linear(c.joint_attention_dim, d, bias=False)
        self.transformer_blocks = nn.ModuleList(_Double(c) for _ in range(c.double))
        self.single_transformer_blocks = nn.ModuleList(_Single(c) for _ in range(c.single))
        self.norm_out = nn.Linear(d, 2 * d, bias=False)
        self.proj_out = nn.Linear(d, c.in_channels, bias=False)

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids):
        half = self.c.timestep_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
        t = (timestep.float() * 1000)[:, None] * freqs[None]
        temb = self.t2(F.silu(self.t1(torch.cat([t.cos(), t.sin()], -1).to(hidden_states.dtype))))
        act = F.silu(temb)[:, None]
        mi, mt, ms = self.mod_img(act), self.mod_txt(act), self.mod_single(act)
        x, ctx = self.x_embedder(hidden_states), self.context_embedder(encoder_hidden_states)
        ids = [i[0] if i.ndim == 3 else i for i in (txt_ids, img_ids)]  # (S, 4) or batched (B, S, 4), as diffusers
        cos, sin = _rope(torch.cat(ids), self.c.axes, self.c.rope_theta)
        for b in self.transformer_blocks:
            x, ctx = b(x, ctx, mi, mt, cos, sin)
        x = torch.cat([ctx, x], 1)
        for b in self.single_transformer_blocks:
            x = b(x, ms, cos, sin)
        x = x[:, ctx.shape[1]:]
        scale, shift = self.norm_out(act[:, 0]).chunk(2, -1)
        x = F.layer_norm(x, x.shape[-1:], eps=self.c.eps) * (1 + scale[:, None]) + shift[:, None]
        return self.proj_out(x)


# ------------------------------------------------------------------------------------------ model build
def build(cfg: KleinConfig, device: str, dtype: torch.dtype, force_mini: bool = False) -> tuple[nn.Module, str]:
    """Random-weight module on `device`, allocated there directly (meta init: no host copy of 8 GB)."""
    impl = "diffusers.Flux2Transformer2DModel"
    try:
        if force_mini:
            raise ImportError
        from diffusers import Flux2Transformer2DModel

        kwargs = dict(patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.double, num_single_layers=cfg.single,
                      attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
                      joint_attention_dim=cfg.joint_attention_dim, timestep_guidance_channels=cfg.timestep_channels,
                      mlp_ratio=cfg.mlp_ratio, axes_dims_rope=cfg.axes, rope_theta=cfg.rope_theta, eps=cfg.eps,
                      guidance_embeds=False)
        with torch.device("meta"):
            model = Flux2Transformer2DModel(**kwargs)

        def call(m, x, ctx, t, img_ids, txt_ids):
            return m(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                     return_dict=False)[0]
    except ImportError:
        impl = "MiniFlux2 (reimplementation; diffusers not importable)"
        with torch.device("meta"):
            model = MiniFlux2(cfg)

        def call(m, x, ctx, t, img_ids, txt_ids):
            return m(x, ctx, t, img_ids, txt_ids)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
        for _, b in model.named_buffers():
            b.zero_()
    model.eval().requires_grad_(False)
    model.call = call  # type: ignore[attr-defined]
    return model, impl


def inputs(cfg: KleinConfig, size: int, txt: int, batch: int, device: str, dtype: torch.dtype):
    side = size // 16  # VAE x8, 2x2 patchify
    img = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
    tids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(txt))
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, side * side, cfg.in_channels, generator=g).to(device, dtype),
            torch.randn(batch, txt, cfg.joint_attention_dim, generator=g).to(device, dtype),
            torch.full((batch,), 0.5, device=device, dtype=dtype),
            img.to(device), tids.to(device)), side * side


# ----------------------------------------------------------------------------------------------- FP8
class Fp8Linear(nn.Module):
    """y = x W^T with x, W in E4M3 and per-tensor scales, via torch._scaled_mm (FP32 accumulate)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach()
        self.out_dtype = w.dtype
        self.w_scale = (w.abs().amax().float() / 448.0).clamp(min=1e-12)
        self.w_t = (w.float() / self.w_scale).to(torch.float8_e4m3fn).t()  # column-major view, as _scaled_mm wants
        self.bias = lin.bias

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_scale = (x2.abs().amax().float() / 448.0).clamp(min=1e-12)
        xq = (x2.float() / x_scale).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.w_t, scale_a=x_scale, scale_b=self.w_scale, out_dtype=self.out_dtype,
                             bias=self.bias)
        return y.reshape(*shape[:-1], -1)


def to_fp8(model: nn.Module) -> int:
    """Swap every Linear inside the transformer blocks (the ~97% of FLOPs); embedders/modulation stay BF16,
    as the FP8 policy keeps them (export/fp8_policy.py)."""
    n = 0
    for blocks in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(model, blocks):
            for name, mod in list(block.named_modules()):
                for cname, child in list(mod.named_children()):
                    if isinstance(child, nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                        setattr(mod, cname, Fp8Linear(child))
                        n += 1
    return n


# ------------------------------------------------------------------------------------------ TensorRT
class _Traced(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *a):
        return self.m.call(self.m, *a)


INPUT_NAMES = ["hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids"]


def fp8_qdq_onnx(model, args, path: str, say=print) -> int:
    """Export `model` (dynamo) with explicit FP8 E4M3 Q/DQ in front of both inputs of every block MatMul.

    Activation scales: amax of each Linear's input over one forward on `args` / 448; weight scales: amax / 448.
    Embedders, modulation and output layers stay in the model's dtype (as edgegen's FP8 policy keeps them).
    Returns the number of MatMuls quantized."""
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir
    import onnxscript

    amax: dict[str, float] = {}
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=name: amax.__setitem__(
                n, max(amax.get(n, 0.0), float(a[0].detach().abs().amax().float()))))
             for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and "transformer_blocks." in name]
    with torch.no_grad():
        model.call(model, *args)
    for h in hooks:
        h.remove()
    say("exporting ONNX (dynamo) ...")
    program = torch.onnx.export(_Traced(model).eval(), args, input_names=INPUT_NAMES, output_names=["noise_pred"],
                                dynamo=True, optimize=False, verbose=False)
    graph = program.model.graph
    np_types = {ir.DataType.BFLOAT16: ml_dtypes.bfloat16, ir.DataType.FLOAT16: np.float16,
                ir.DataType.FLOAT: np.float32}

    def initializer(name, array):
        v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.tensor(array).dtype),
                     const_value=ir.tensor(array, name=name))
        graph.register_initializer(v)
        return v

    def qdq(before, value, dtype, amax_value, tag):
        scale = initializer(f"{tag}.scale", np.array(max(amax_value, 1e-6) / 448.0, dtype=np_types[dtype]))
        zero = initializer(f"{tag}.zero", np.zeros((), dtype=ml_dtypes.float8_e4m3fn))
        q = ir.node("QuantizeLinear", [value, scale, zero])
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero])
        graph.insert_before(before, [q, dq])
        return dq.outputs[0]

    done = 0
    for node in list(graph):
        if node.op_type != "MatMul":
            continue
        w = node.inputs[1]
        prod = w.producer()
        src = prod.inputs[0] if prod is not None and prod.op_type == "Transpose" else w
        if src is None or not src.is_initializer() or src.const_value is None:
            continue
        name = src.name.removeprefix("m.").rsplit(".weight", 1)[0]
        if name not in amax:
            continue
        dtype = src.const_value.dtype
        w_amax = float(np.abs(src.const_value.numpy().astype(np.float32)).max())
        node.replace_input_with(0, qdq(node, node.inputs[0], dtype, amax[name], f"{name}.input"))
        node.replace_input_with(1, qdq(node, node.inputs[1], dtype, w_amax, f"{name}.weight"))
        done += 1
    onnxscript.optimizer.optimize(program.model, num_iterations=1)  # folds weight transposes, keeps Q/DQ
    program.save(path, external_data=True)
    return done


def trt_engine(path: str, out_shape, out_dtype, say=print):
    """Strongly typed TensorRT engine from `path`; returns run(*inputs) -> output tensor (CUDA)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(path):
        raise RuntimeError("TensorRT could not parse the ONNX: " +
                           "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    say("building TensorRT engine ...")
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    if plan is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    ctx = engine.create_execution_context()
    out = torch.empty(out_shape, device="cuda", dtype=out_dtype)

    def run(*inputs):
        for n, t in zip(INPUT_NAMES, inputs):
            ctx.set_input_shape(n, tuple(t.shape))
            ctx.set_tensor_address(n, t.data_ptr())
        ctx.set_tensor_address("noise_pred", out.data_ptr())
        ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return out

    return run


def smoke_fp8_onnx(model, args, workdir: str, say) -> float:
    """CPU check of the Q/DQ graph the TensorRT path builds: ONNX Runtime runs it; cosine vs PyTorch."""
    import numpy as np
    import onnxruntime as ort

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "smoke_fp8.onnx")
    n = fp8_qdq_onnx(model, args, path, say)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), args)}
    got = sess.run(None, feeds)[0].ravel().astype(np.float64)
    with torch.no_grad():
        ref = model.call(model, *args).numpy().ravel().astype(np.float64)
    cos = float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref)))
    say(f"FP8 Q/DQ ONNX: {n} MatMuls quantized; ONNX Runtime output cosine vs PyTorch {cos:.4f}")
    return cos


# ---------------------------------------------------------------------------------------------- timing
def nvml_used(index: int = 0) -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used / 2**30
    except Exception:
        return None


def time_fn(fn, device: str, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def counted_flops(model, args) -> int:
    """torch.utils.flop_counter's count of one forward. SDPA is forced onto its math backend so attention is
    counted as its two matmuls (the fused CPU flash kernel is not registered with the counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.call(model, *args)
    return counter.get_total_flops()


def peak_for(name: str) -> tuple[float | None, float | None]:
    for key in sorted(PEAKS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAKS[key]
    return None, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=512, help="Klein pads every prompt to 512")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--modes", default="eager,compile,fp8-torch,trt-fp8")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new mode after this many seconds")
    p.add_argument("--peak-tflops", type=float, help="override the BF16 dense peak")
    p.add_argument("--mini", action="store_true", help="use the reimplementation even if diffusers imports")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny width, FP32: exercise code paths and FLOP count")
    p.add_argument("--skip-onnx", action="store_true", help="--smoke without the FP8 Q/DQ ONNX export check")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--workdir", default="/tmp/edgegen-gpu-bench")
    a = p.parse_args(argv)
    t_start = time.monotonic()
    say = lambda m: print(f"[{time.monotonic() - t_start:6.1f}s] {m}", flush=True)  # noqa: E731

    if a.smoke:
        cfg, device, dtype = SMOKE, "cpu", torch.float32
        size, txt = min(a.size, 128), min(a.text_tokens, 32)
        modes = [m for m in a.modes.split(",") if m == "eager"] or ["eager"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke on a CPU machine", file=sys.stderr)
            return 2
        cfg, device, dtype = KLEIN_4B, "cuda", torch.bfloat16
        size, txt, modes = a.size, a.text_tokens, a.modes.split(",")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke)"
    cap = torch.cuda.get_device_capability(0) if device == "cuda" else (0, 0)
    peak_bf16, peak_fp8 = peak_for(gpu)
    peak_bf16 = a.peak_tflops or peak_bf16
    vram_before = nvml_used() if device == "cuda" else None

    model, impl = build(cfg, device, dtype, a.mini)
    n_params = sum(p.numel() for p in model.parameters())
    args, img_tokens = inputs(cfg, size, txt, a.batch, device, dtype)
    flops = flops_per_step(cfg, img_tokens, txt, a.batch)
    say(f"{impl}: {n_params / 1e9:.4g} B parameters, {img_tokens} image + {txt} text tokens, "
        f"{flops['total'] / 1e12:.4g} TFLOP/step (attention {flops['attention_share']:.0%})")
    smoke: dict = {}
    if a.smoke:  # cross-check the analytic count against torch's own counter
        smoke["flop_counter_ratio"] = counted_flops(model, args) / flops["total"]
        say(f"flop_counter / analytic FLOPs: {smoke['flop_counter_ratio']:.4f}")
        if not a.skip_onnx:
            smoke["fp8_onnx_cosine"] = smoke_fp8_onnx(model, args, a.workdir, say)

    rows = []
    for mode in modes:
        if time.monotonic() - t_start > a.budget_s:
            rows.append({"mode": mode, "skipped": "time budget spent"})
            continue
        try:
            fn, peak, label = None, peak_bf16, mode
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if mode == "eager":
                fn = lambda: model.call(model, *args)  # noqa: E731
            elif mode == "compile":
                compiled = torch.compile(model)
                fn = lambda: model.call(compiled, *args)  # noqa: E731
            elif mode == "fp8-torch":
                if cap < (8, 9):
                    rows.append({"mode": mode, "skipped": f"FP8 needs SM >= 8.9, this GPU is SM{cap[0]}{cap[1]}"})
                    continue
                fp8_model, _ = build(cfg, device, dtype, a.mini)
                del model
                torch.cuda.empty_cache()
                model = fp8_model
                say(f"FP8: {to_fp8(model)} Linear layers on torch._scaled_mm")
                compiled = torch.compile(model)
                fn = lambda: model.call(compiled, *args)  # noqa: E731
                peak = peak_fp8
            elif mode == "trt-fp8":
                try:
                    import tensorrt  # noqa: F401
                except ImportError:
                    rows.append({"mode": mode, "skipped": "tensorrt not importable"})
                    continue
                if cap < (8, 9):
                    rows.append({"mode": mode, "skipped": f"FP8 needs SM >= 8.9, this GPU is SM{cap[0]}{cap[1]}"})
                    continue
                os.makedirs(a.workdir, exist_ok=True)
                bf16_model, _ = build(cfg, device, dtype, a.mini)
                path = os.path.join(a.workdir, "klein4b_fp8.onnx")
                say(f"FP8 Q/DQ on {fp8_qdq_onnx(bf16_model, args, path, say)} MatMuls")
                del bf16_model
                torch.cuda.empty_cache()
                run = trt_engine(path, args[0].shape[:2] + (cfg.in_channels,), dtype, say)
                fn = lambda: run(*args)  # noqa: E731
                peak = peak_fp8
            else:
                rows.append({"mode": mode, "skipped": "unknown mode"})
                continue
            say(f"{label}: warming up ({a.warmup}) ...")
            with torch.no_grad():
                t0 = time.monotonic()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                first = time.monotonic() - t0
                times = time_fn(fn, device, max(0, a.warmup - 1), a.iters)
            med = statistics.median(times)
            row = {"mode": label, "first_call_s": round(first, 2), "median_ms": round(med * 1000, 2),
                   "min_ms": round(min(times) * 1000, 2), "tflops": round(flops["total"] / med / 1e12, 1),
                   "peak_tflops": peak, "fraction_of_peak": round(flops["total"] / med / 1e12 / peak, 3) if peak else None}
            if device == "cuda":
                row["torch_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                used = nvml_used()
                row["nvml_used_gib"] = round(used, 2) if used is not None else None
            rows.append(row)
            say(json.dumps(row))
        except Exception as e:  # one mode failing must not lose the others' numbers
            rows.append({"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            say(f"{mode} failed: {rows[-1]['error']}")

    print()
    print(f"GPU: {gpu} (SM{cap[0]}{cap[1]}), torch {torch.__version__}, module: {impl}")
    print(f"shape: batch {a.batch}, {size}x{size} -> {img_tokens} image tokens + {txt} text tokens; "
          f"{flops['total'] / 1e12:.2f} TFLOP/step; NVML used before load: "
          f"{'n/a' if vram_before is None else f'{vram_before:.2f} GiB'}")
    print("| mode | first call s | median ms/step | min ms | TFLOPS | peak TFLOPS | of peak | torch max alloc GiB | NVML used GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "median_ms" in r:
            frac = f"{r['fraction_of_peak']:.1%}" if r.get("fraction_of_peak") else "n/a"
            print(f"| {r['mode']} | {r['first_call_s']} | {r['median_ms']} | {r['min_ms']} | {r['tflops']} | "
                  f"{r['peak_tflops'] or 'n/a'} | {frac} | {r.get('torch_max_allocated_gib', 'n/a')} | "
                  f"{r.get('nvml_used_gib', 'n/a')} |")
        else:
            print(f"| {r['mode']} | {r.get('skipped') or r.get('error')} |||||||| ")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": gpu, "impl": impl, "flops": flops, "rows": rows, "size": size, "text_tokens": txt,
                       "parameters": n_params, **({"smoke": smoke} if a.smoke else {})}, f, indent=1)
    print(f"total {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
