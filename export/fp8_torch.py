"""FP8 through ModelOpt's PyTorch path: for transformers whose FP32 graph does not fit in the build machine.

export/fp8.py quantizes the FP32 ONNX graph with ModelOpt's ONNX PTQ: the FP32 graph (4 bytes per weight) plus
about two more copies while ModelOpt calibrates it in ONNX Runtime, with the whole FP32 bundle open to capture
the calibration feeds: about 58 GiB for FLUX.2 Klein 4B (export/preflight.py). This path never widens the model:

1. the transformer is exported as its BF16 graph (export/bf16.py: one BF16 copy, 1.3x its bytes at most);
2. ModelOpt quantizes the BF16 PyTorch module (mtq.quantize: per-tensor E4M3 on every Linear's input and weight,
   "max" calibration) while the real sampler runs the calibration prompts through it, in PyTorch on the GPU
   when there is one and on the CPU otherwise: the text encoders first (then released), then the transformer;
3. the calibrated input ranges go into the BF16 graph as standard QuantizeLinear/DequantizeLinear pairs, and
   each quantized weight is stored as FLOAT8E4M3FN feeding a DequantizeLinear (per-tensor scale amax/448):
   the form export/fp8.py writes, which ONNX Runtime, TensorRT and TensorRT-RTX all load. The rewrite streams
   the weights file tensor by tensor, so it needs one tensor's memory.

What stays high precision comes from export/fp8_policy.py, as for the ONNX path; the rest of the graph stays
BF16 (the ONNX path's rest is FP16). Checks (README, "Two FP8 paths"): the FP8 graph against the BF16 graph it came from,
both run as FP32 twins in ONNX Runtime on held-out sampler inputs (the graph is right and what FP8 costs the
transformer's output), and images of the BF16 module against the same module quantized by ModelOpt (what FP8
costs the image), on the fixed prompts and seeds of export/calibrate.py.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from app.errors import UsageError
from export.fp8 import FP8, FP8_MAX, _scopes

DATA_NAME = "model.onnx.data"
Say = Callable[[str], None]


# --- calibration (ModelOpt, PyTorch) -----------------------------------------------------------------------


def linear_modules(module: torch.nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def excluded_modules(module: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Linear modules the policy keeps high precision; a pattern that matches no module fails (the module
    paths changed, and going on would quantize what the policy protects)."""
    compiled = [re.compile(p) for p in patterns]
    names = linear_modules(module)
    # A pattern names the layer or a module around it (the ONNX path matches every enclosing scope too).
    paths = {n: [".".join(n.split(".")[: k + 1]) for k in range(n.count(".") + 1)] for n in names}
    hit = lambda p, n: any(p.search(s) for s in paths[n])  # noqa: E731
    every = [n for n, _ in module.named_modules() if n]  # a pattern may name a conv embedder (SD3's pos_embed)
    unmatched = [p.pattern for p in compiled if not any(p.search(n) for n in every)]
    if unmatched:
        raise UsageError(f"FP8 exclude patterns {unmatched} match no module of the transformer; "
                         "the policy (export/fp8_policy.py) and the model disagree")
    return [n for n in names if any(hit(p, n) for p in compiled)]


def quant_config(excluded: Sequence[str]) -> dict:
    """Per-tensor E4M3 on every Linear's input and weight, "max" calibration; `excluded` modules untouched."""
    fp8 = {"num_bits": (4, 3), "axis": None}
    return {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                          {"quantizer_name": "*weight_quantizer", "cfg": fp8},
                          {"quantizer_name": "*input_quantizer", "cfg": fp8},
                          *({"quantizer_name": f"{name}.*", "enable": False} for name in excluded)],
            "algorithm": "max"}


def _modelopt_quantization():
    """modelopt.torch.quantization, imported the first time on a thread of its own. Importing it pins the
    importing frame, and through f_back every caller's frame, for the life of the process (checked: a local of the
    function that imports it stays alive after that function returns; which part of ModelOpt holds the frame was
    not traced). Imported inside calibrate() it kept the calibrated BF16 transformer and the calibration loop (its
    pipeline: text embeddings, VAE) alive through the FP8 check: memory-mapped weights that made up about 9 GiB of
    Klein 4B's 17.3 GiB peak (docs/PERFORMANCE.md 1c). A fresh thread's stack holds nothing."""
    name = "modelopt.torch.quantization"
    if name not in sys.modules:
        def load():
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the import below raises it again, on the caller's thread
                pass
        t = threading.Thread(target=load, name="modelopt-import", daemon=True)
        t.start()
        t.join()
    return importlib.import_module(name)


def calibrate(module: torch.nn.Module, forward_loop: Callable[[torch.nn.Module], None],
              excluded: Sequence[str]) -> dict[str, float]:
    """Quantize `module` in place with ModelOpt, calibrating on `forward_loop`; returns each quantized Linear's
    input amax by module path. The module then runs FP8 fake quantization (ModelOpt's own arithmetic)."""
    mtq = _modelopt_quantization()
    linear = set(linear_modules(module))
    mtq.quantize(module, quant_config(excluded))  # quantizers in place, not yet calibrated
    # ModelOpt also wraps norms and other modules it knows; only linear layers become FP8 here.
    mtq.disable_quantizer(module, lambda name: name.rsplit(".", 1)[0] not in linear)
    mtq.calibrate(module, algorithm="max", forward_loop=forward_loop)
    amax = {}
    for name, m in module.named_modules():
        q = getattr(m, "input_quantizer", None)
        if name in linear and q is not None and q.is_enabled and getattr(q, "amax", None) is not None:
            amax[name] = float(q.amax.float().max())
    if not amax:
        raise UsageError("ModelOpt calibrated no layer of the transformer; check the FP8 policy")
    return amax


def matmul_tflop(params: int, tokens: int) -> float:
    """Forward cost of a transformer: two FLOPs per weight per token (attention's own products are small here)."""
    return 2.0 * params * tokens / 1e12


def measured_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 2048) -> float:
    """This device's matrix-multiply speed in `dtype`, measured in about a second (for the time estimate)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.5 or reps < 2:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


# --- the Q/DQ graph (ONNX, streamed) ------------------------------------------------------------------------


def _read(init: onnx.TensorProto, base: Path) -> bytes:
    """An initializer's raw bytes, from its external data file when it has one."""
    if init.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in init.external_data}
        with open(base / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"]))
    if init.raw_data:
        return init.raw_data
    return numpy_helper.to_array(init).tobytes()


def _array(init: onnx.TensorProto, base: Path) -> np.ndarray:
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(init)
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    return np.frombuffer(_read(init, base), dtype=dtype).reshape(tuple(init.dims))


def _scalar(value: float, dtype: np.dtype, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32).astype(dtype), name)


def write_qdq(src: Path, dst: Path, amax: dict[str, float], say: Say | None = None) -> dict:
    """Write `dst`: the BF16 graph `src` with FP8 Q/DQ on the input and weight of every MatMul whose module has a
    calibrated input range in `amax` (module path -> amax). Weights are read, quantized and written one at a
    time; everything else is copied byte for byte. Returns a report like export/fp8.py's."""
    say = say or (lambda _m: None)
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    linear, targets = [], {}
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        linear.append(node.name)
        module = next((s for s in reversed(_scopes(node, set(inits))) if s in amax), None)
        if node.op_type == "MatMul" and module is not None and len(inits[node.input[1]].dims) == 2:
            targets[node.name] = module
    mapped = set(targets.values())
    missing = sorted(set(amax) - mapped)
    if not targets or missing:
        raise UsageError(f"the BF16 graph has no MatMul for {len(missing)} calibrated layers (e.g. "
                         f"{missing[:3]}); the graph lost its module paths (pkg.torch.onnx.name_scopes)")

    zero = "fp8_zero_point"
    new_inits = [helper.make_tensor(zero, FP8, [], b"\x00", raw=True)]
    act: dict[tuple[str, float], str] = {}  # (activation, amax) -> its DequantizeLinear output
    fp8_weights: dict[str, tuple[str, float]] = {}  # BF16 weight -> (FP8 initializer, scale)
    nodes, skipped = [], []
    for node in g.node:
        module = targets.get(node.name)
        a = amax.get(module) if module else None
        if module is not None and not (a and np.isfinite(a) and a > 0):
            skipped.append(node.name)  # never reached by calibration (a dead branch): stays BF16
            module = None
        if module is not None:
            x, w = node.input[0], node.input[1]
            dtype = helper.tensor_dtype_to_np_dtype(inits[w].data_type)
            key = (x, a)
            if key not in act:
                s = f"{node.name}/act_scale"
                new_inits.append(_scalar(a / FP8_MAX, dtype, s))
                q = helper.make_node("QuantizeLinear", [x, s, zero], [f"{node.name}/act_fp8"], name=f"{node.name}/q")
                dq = helper.make_node("DequantizeLinear", [q.output[0], s, zero], [f"{node.name}/act_dq"],
                                      name=f"{node.name}/dq")
                nodes += [q, dq]
                act[key] = dq.output[0]
            fp8_weights.setdefault(w, (f"{w}__fp8", 0.0))
            dqw = helper.make_node("DequantizeLinear", [fp8_weights[w][0], f"{w}__scale", zero],
                                   [f"{node.name}/w_dq"], name=f"{node.name}/dq_w")
            nodes.append(dqw)
            node.input[0], node.input[1] = act[key], dqw.output[0]
            uses[w] -= 1
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)

    # Initializers: FP8 weights replace BF16 ones no other node reads; every tensor keeps its place in a
    # fresh weights file (or stays inline, as in the source).
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in g.initializer)
    kept = {i.name for i in g.initializer if not (i.name in fp8_weights and uses.get(i.name, 0) == 0)}
    out_inits, t0, done = [], time.monotonic(), 0
    data = open(dst.parent / DATA_NAME, "wb") if external else None
    try:
        def place(tensor: onnx.TensorProto, raw: bytes) -> onnx.TensorProto:
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            if data is None or len(raw) < 1024:
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = raw
                return tensor
            offset = data.tell()
            data.write(raw)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(len(raw)))):
                tensor.external_data.add(key=k, value=v)
            return tensor

        for init in [*g.initializer]:
            if init.name in fp8_weights:
                import ml_dtypes

                w = _array(init, src.parent).astype(np.float32)  # one weight at a time, scaled in place
                peak = max(abs(float(w.max())), abs(float(w.min()))) if w.size else 0.0
                scale_t = _scalar(peak / FP8_MAX if peak > 0 else 1.0, helper.tensor_dtype_to_np_dtype(init.data_type),
                                  f"{init.name}__scale")
                scale = float(numpy_helper.to_array(scale_t).astype(np.float32))  # what the DQ decodes with
                w /= scale
                np.clip(w, -FP8_MAX, FP8_MAX, out=w)
                q8 = w.astype(ml_dtypes.float8_e4m3fn)
                del w
                t = onnx.TensorProto(name=fp8_weights[init.name][0], data_type=FP8, dims=list(init.dims))
                out_inits += [place(t, q8.view(np.uint8).tobytes()), scale_t]
                fp8_weights[init.name] = (t.name, scale)
                done += 1
                if done % 50 == 0:
                    say(f"fp8: {done}/{len(fp8_weights)} weights stored as FP8 ({time.monotonic() - t0:.0f}s)")
            if init.name in kept:
                raw = _read(init, src.parent)
                copy = onnx.TensorProto()
                copy.CopyFrom(init)
                out_inits.append(place(copy, raw))
    finally:
        if data is not None:
            data.close()
    del g.initializer[:]
    g.initializer.extend(new_inits + out_inits)
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))

    from modelopt import __version__ as modelopt_version

    return {"quantized_nodes": [n for n in targets if n not in skipped], "skipped_uncalibrated": skipped,
            "unquantized_linear_nodes": [n for n in linear if n not in targets],
            "bytes_bf16": _file_bytes(src), "bytes_fp8": _file_bytes(dst), "algorithm": "max",
            "granularity": "per-tensor", "high_precision": "bf16", "path": "torch",
            "modelopt_version": modelopt_version}


def _file_bytes(onnx_path: Path) -> int:
    """The graph file plus its weights file (twins and other graphs in the folder are not counted)."""
    p = Path(onnx_path)
    return p.stat().st_size + sum(f.stat().st_size for f in p.parent.glob(f"{p.name}.data"))


def twin_outputs(onnx_path: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs of the graph's FP32 twin (export/bf16.py) in ONNX Runtime's CPU provider on `feeds`."""
    from export.bf16 import fp32_twin, twin_session

    twin = Path(onnx_path).with_name("model.fp32.onnx")
    if not twin.is_file():
        twin = fp32_twin(onnx_path)
        _weights_cast_when_used(twin)
    sess = twin_session(twin)
    names = [o.name for o in sess.get_outputs()]
    try:
        return [sess.run(names, feed) for feed in feeds]
    finally:
        del sess


def _weights_cast_when_used(twin: Path) -> int:
    """In the FP32 twin of an FP8 graph, give each weight's DequantizeLinear a scale that depends on its layer's
    activation (scale * 1, the 1 computed from the activation's size): the same numbers, but ONNX Runtime can no
    longer dequantize every weight before the first layer runs. Ungated, it did (Klein 4B: 12.9 GiB of FP32
    weights held at once, measured); gated, a layer's FP32 weight exists only around its MatMul. Returns how
    many were gated."""
    m = onnx.load(str(twin), load_external_data=False)
    fp8 = {i.name for i in m.graph.initializer if i.data_type == FP8 and len(i.dims)}
    consumer = {i: n for n in m.graph.node for i in n.input}
    zero = "gate_zero"
    m.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), zero))
    nodes, changed, gates = [], 0, {}
    for n in m.graph.node:
        mm = consumer.get(n.output[0]) if n.op_type == "DequantizeLinear" and n.input[0] in fp8 else None
        if mm is not None and mm.op_type == "MatMul" and mm.input[1] == n.output[0]:
            x = mm.input[0]
            if x not in gates:
                g = f"{x}/gate"
                nodes += [helper.make_node("Size", [x], [f"{g}/size"], name=f"{g}/size"),
                          helper.make_node("Greater", [f"{g}/size", zero], [f"{g}/pos"], name=f"{g}/pos"),
                          helper.make_node("Cast", [f"{g}/pos"], [g], to=onnx.TensorProto.FLOAT, name=f"{g}/one")]
                gates[x] = g
            gated = f"{n.name}/gated_scale"
            nodes.append(helper.make_node("Mul", [n.input[1], gates[x]], [gated], name=gated))
            n.input[1] = gated
            changed += 1
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, str(twin))
    return changed


def compare(ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> dict:
    """Worst cosine and relative error over every output of every feed (export/onnx_export.compare per feed), and
    whether all are finite (a NaN makes the figures NaN)."""
    from export.onnx_export import compare as compare_one

    per = [compare_one(dict(enumerate(r)), dict(enumerate(o))) for r, o in zip(ref, out)]
    finite = not any(math.isnan(c["cosine"]) for c in per)
    cos = [c["cosine"] for c in per]
    return {"cosine_min": min(cos) if finite else math.nan, "cosine_mean": float(np.mean(cos)),
            "max_rel_error": max(c["max_rel_err"] for c in per) if finite else math.nan, "finite": finite,
            "samples": len(ref)}


# --- the whole step, as export runs it -----------------------------------------------------------------------


# ModelOpt's FP8 fake quantization (the FP8 check images) over an unquantized BF16 step, by device: measured 7.8x on
# this CPU for Klein 9B at real size (docs/PERFORMANCE.md 1c); the GPU's has not been measured.
FAKE_QUANT_SLOWDOWN = {"cpu": 7.8}


def calibration_device() -> torch.device:
    """The GPU when PyTorch sees one (calibration at full size in seconds), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def default_size(manifest: dict, device: torch.device) -> int:
    """The bundle's default size on a GPU; on the CPU at most 512 px (a 4B transformer at 1024 px is ~150
    TFLOP per prompt), inside the bundle's range."""
    d, r = manifest["defaults"], manifest["size_range"]
    size = min(d["width"], d["height"])
    if device.type == "cpu":
        size = min(size, 512)
    size = max(r["min"], min(r["max"], size))
    return size - size % r["multiple"]


def quantize_transformer(root: Path, manifest: dict, model: Path, prompts: list[str], count: int,
                         size: int | None, patterns: Sequence[str], say: Say, accept_low_fidelity: bool,
                         device: torch.device | None = None, steps: int | None = None,
                         fused_loras: tuple = ()) -> None:
    """Quantize the provisional bundle's BF16 transformer (root/transformer) to FP8 in place, recording what and
    how well in `manifest` (the entry, its gate, and manifest["fidelity"])."""
    import gc

    from app.bundle.manifest import Bundle
    from app.runtime.images import psnr
    from app.runtime.pipelines import GenerationRequest, make_pipeline
    from app.runtime.pipelines.base import to_uint8
    from export import calibrate as cal
    from export.bf16 import HalfTorchBackend
    from export.fidelity import gate

    device = device or calibration_device()
    size = size or default_size(manifest, device)
    bundle = Bundle(root, manifest, "provisional")
    backend = HalfTorchBackend(bundle, model, manifest["component_precisions"], device=device,
                               fused_loras=fused_loras)  # calibrated on the brand's weights, as the ONNX route
    pipe = make_pipeline(bundle, backend, low_vram=False)
    req = lambda p, s: GenerationRequest(prompt=p, seed=s, width=size, height=size, steps=steps)  # noqa: E731
    calib = [req(p, 1000 + i) for i, p in enumerate(prompts[:count])]
    checks = [req(p, s) for p, s in cal.FIDELITY_CASES]  # held out: never calibrated on

    t_start = time.monotonic()
    say(f"[calibration] loading the text encoders in BF16 on {device} ({len(calib)} calibration prompts and "
        f"{len(checks)} check prompts at {size}x{size}; ModelOpt's PyTorch path)")
    encoded = []
    for r in calib + checks:
        job = pipe.prepare(r)
        encoded.append((job, pipe.encode_tokens(job.tokens, job.req)))
    pipe.release(pipe.text_encoders)
    gc.collect()

    module = backend.module("transformer")
    excluded = excluded_modules(module, patterns)
    names = [t["name"] for t in manifest["components"]["transformer"]["inputs"]]
    dtypes = {t["name"]: np.dtype(t["dtype"]) for t in manifest["components"]["transformer"]["inputs"]}
    held: list[dict[str, np.ndarray]] = []
    capture = {"on": False}

    def grab(_m, args):
        if capture["on"]:
            held.append({n: np.asarray(a.detach().float().cpu().numpy() if a.is_floating_point()
                                       else a.detach().cpu().numpy(), dtype=dtypes[n]) for n, a in zip(names, args)})

    hook = module.register_forward_pre_hook(grab)
    t0 = time.monotonic()
    ref_images = []
    for i, (job, cond) in enumerate(encoded[len(calib):]):
        capture["on"] = i == 0
        ref_images.append(to_uint8(pipe.execute(job, cond=cond)))
    capture["on"] = False
    hook.remove()
    held = [held[0], held[-1]] if len(held) > 1 else held  # the first and last step of the first check image
    ref_steps = sum(len(j.timesteps) for j, _ in encoded[len(calib):])
    per_step = (time.monotonic() - t0) / max(ref_steps, 1)
    calib_steps = sum(len(j.timesteps) for j, _ in encoded[:len(calib)])
    per_image = len(encoded[0][0].timesteps)
    minutes = calib_steps * per_step / 60
    fq = FAKE_QUANT_SLOWDOWN.get(device.type)
    images = (f"; then {ref_steps} steps of FP8 check images, about {ref_steps * per_step * fq / 60:.1f} min "
              f"(ModelOpt's fake quantization measured {fq:g}x a BF16 step here)" if fq else
              f"; then {ref_steps} steps of FP8 check images (their cost on {device.type} has not been measured)")
    say(f"[calibration] {len(calib)} prompts ({calib_steps} transformer steps, {per_image} a prompt) with "
        f"ModelOpt, {len(excluded)} layers kept BF16 by policy: about {minutes:.1f} min here "
        f"({per_step:.1f} s a step, measured on the reference images){images}")
    t1 = time.monotonic()
    amax = calibrate(module, lambda _m: [pipe.execute(j, cond=c) for j, c in encoded[:len(calib)]], excluded)
    calib_s = time.monotonic() - t1
    fp8_images = [to_uint8(pipe.execute(job, cond=cond)) for job, cond in encoded[len(calib):]]
    with torch.no_grad():  # ModelOpt's own FP8 arithmetic on the held-out inputs, for the graph's record
        modelopt_out = [[o.float().cpu().numpy() for o in _tuple(module(*[torch.from_numpy(f[n]).to(device)
                                                                          for n in names]))] for f in held]
    del module, encoded, pipe
    backend.release("transformer")
    for name in list(backend._modules):
        backend.release(name)
    gc.collect()

    say(f"[calibration] done in {time.monotonic() - t_start:.1f}s ({calib_s:.1f}s in ModelOpt's calibration)")

    src, dst = root / "transformer" / "model.onnx", root / "transformer_fp8" / "model.onnx"
    t2 = time.monotonic()
    say(f"[fp8_graph] loading the BF16 graph: Q/DQ for {len(amax)} layers, their weights stored as FP8")
    report = write_qdq(src, dst, amax, lambda m: say(f"[fp8_graph] {m}"))
    say(f"[fp8_graph] done in {time.monotonic() - t2:.1f}s")
    t3 = time.monotonic()
    say("[fp8_check] loading the FP8 and BF16 graphs as FP32 twins (ONNX Runtime), one at a time, on "
        f"{len(held)} held-out sampler inputs")
    ref_out = twin_outputs(src, held)
    q_out = twin_outputs(dst, held)
    cos = compare(ref_out, q_out)
    say(f"[fp8_check] done in {time.monotonic() - t3:.1f}s")
    vs_modelopt = compare(modelopt_out, q_out)
    if not cos["finite"]:
        from app.errors import EdgegenError

        raise EdgegenError("the FP8 transformer produced NaN or Inf on held-out inputs; export it with "
                           "--precision bf16")
    image_psnr = [psnr(a, b) for a, b in zip(ref_images, fp8_images)]

    entry = manifest["components"]["transformer"]
    entry["precision"] = "fp8"
    entry["runs_on"] = ["tensorrt-rtx (sm89+)", "tensorrt (sm89+)", "onnxruntime (CUDA only: BF16 rest)"]
    entry["fp8"] = {k: v for k, v in report.items() if k not in ("quantized_nodes",)}
    entry["fp8"].update(quantized=len(report["quantized_nodes"]), excluded_modules=excluded,
                        exclude_patterns=list(patterns), calibration_samples=calib_steps, calibration_prompts=len(calib),
                        calibration_steps_per_image=per_image,
                        calibration_size=size, calibration_device=str(device), calibration_seconds=round(calib_s, 1),
                        size_ratio_vs_bf16=round(report["bytes_fp8"] / report["bytes_bf16"], 3))
    entry["fidelity_fp8"] = {"output_cosine_min": cos["cosine_min"], "output_cosine_mean": cos["cosine_mean"],
                             "max_rel_err": cos["max_rel_error"], "held_out_samples": cos["samples"],
                             "reference": "the BF16 graph it was quantized from (both as FP32 twins)",
                             "graph_vs_modelopt_cosine_min": vs_modelopt["cosine_min"]}
    entry["fp8_fidelity_gate"] = gate("transformer", "fp8", cos["cosine_min"], cos["max_rel_error"],
                                      accept_low_fidelity)
    manifest["component_precisions"] = {**manifest["component_precisions"], "transformer": "fp8"}
    half = manifest.pop("fidelity", None)
    manifest["fidelity"] = {"image_psnr_vs_bf16_db": min(image_psnr),
                            "image_psnr_per_case_db": [round(p, 2) for p in image_psnr],
                            "image_cases": [list(c) for c in cal.FIDELITY_CASES], "fp8_components": ["transformer"],
                            "fp8_path": "torch", "output_cosine_min": {"transformer": cos["cosine_min"]},
                            "transformer_cosine": cos["cosine_min"],
                            "reference": ("the same modules in PyTorch BF16, unquantized; FP8 images: ModelOpt's "
                                          "fake-quantized module at the calibrated ranges")}
    if half:
        manifest["fidelity"]["half"] = half
    import shutil

    shutil.rmtree(root / "transformer")
    (root / "transformer_fp8").rename(root / "transformer")
    say(f"[fidelity] transformer FP8 vs BF16 graph: output cosine {cos['cosine_min']:.5f} (held-out); images "
        f"{min(image_psnr):.1f} dB vs BF16; {len(report['quantized_nodes'])} layers FP8, file "
        f"{report['bytes_fp8'] / 2**20:.1f} MiB vs {report['bytes_bf16'] / 2**20:.1f} MiB BF16")


def _tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)
